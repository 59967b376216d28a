"""Exact testbeds: analytic teachers with known data distributions and reference flow maps.

An :class:`ExactTestbed` bundles a teacher whose velocity is exact, samples of its data distribution
(to train on and to measure sample quality against), and the sample-distance metrics that fit its
data: sliced Wasserstein-2 and MMD for low-dimensional data, Frechet distances in fixed feature
spaces (top principal components of the data; for MNIST also a small shipped classifier) for
images. The reference flow map ``Phi(x, 1, 0)`` is an adaptive Dormand-Prince solve of the exact
velocity (:func:`reference_flow_map`), whose accuracy the solver benchmark reports.

Built-in testbeds (``make_testbed(name, path=...)``):

=========== ====================================================================================
``gmm8``    2-D, 8 equal Gaussians (std 0.1) on a circle of radius 2; label = component.
``checker`` 2-D, checkerboard-like: 8 anisotropic Gaussians in the dark cells of a 4x4 board.
``gmm_hd``  8-D, 6 Gaussians with unequal weights and random full covariances (seeded).
``digits``  ideal denoiser of scikit-learn's 1797 8x8 digits (bundled, offline); label = digit.
``mnist``   ideal denoiser of the first ``subset`` MNIST training images (a path or tfds).
=========== ====================================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.data import ArraySource, BatchSource, SamplerSource
from fewstep_jax.metrics import sample_distances
from fewstep_jax.paths import Path, get_path
from fewstep_jax.teachers.analytic import (
    gaussian_mixture_teacher,
    gmm_params,
    gmm_sample,
    ideal_denoiser_teacher,
)
from fewstep_jax.teachers.base import Teacher
from fewstep_jax.testbeds.base import Testbed

LOWDIM = ("gmm8", "checker", "gmm_hd")
IMAGES = ("digits", "mnist")
TESTBEDS = LOWDIM + IMAGES


@dataclasses.dataclass(frozen=True)
class ExactTestbed(Testbed):
    """An analytic teacher and what is needed to score samples against its data distribution.

    Attributes:
      name: testbed name.
      teacher: the exact teacher (``exact_teacher``).
      reference: samples of the data distribution, ``{"x": (N, ...), "label": (N,)}``.
      sample_data: ``(np.random.Generator, n) -> {"x", "label"}``: training data (fresh exact
        samples for mixtures; draws from the finite set for ideal denoisers).
      features: named feature maps ``(N, ...) -> (N, F)`` for Frechet distances (images only).
      train_data: ``() -> {"x", "label"}``, the image set training batches are drawn from (images
        only; for ``mnist`` the whole split, not only the ``subset`` the teacher denoises); None:
        batches are fresh ``sample_data`` draws.
    """

    name: str
    teacher: Teacher
    reference: dict
    sample_data: Callable[[np.random.Generator, int], dict]
    features: dict = dataclasses.field(default_factory=dict)
    train_data: Callable[[], dict] | None = None

    @property
    def exact_teacher(self) -> Teacher:
        return self.teacher

    @property
    def path(self) -> Path:
        return self.teacher.path

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.teacher.data_shape)

    @property
    def is_image(self) -> bool:
        return len(self.teacher.data_shape) == 3

    @property
    def singular_at_data(self) -> bool:
        """Whether the teacher's velocity is singular at t = 0, so that no solver stage may land
        there: the ideal denoiser of a finite set (no density), and VP paths whose sigma ~ sqrt(t)
        has an infinite time derivative at the data (``Path.deriv_floor > 0``)."""
        return self.is_image or self.teacher.path.deriv_floor > 0

    def check_model(self, model_cfg) -> None:
        """Accepts any network: a model that cannot take the testbed's samples fails at its init."""

    def source(
        self, conditional: bool, batch_size: int, seed: int, process_index: int, process_count: int
    ) -> BatchSource:
        """Training batches: gathered from ``train_data`` (images) or fresh ``sample_data`` draws."""
        keys = ("x", "label") if conditional else ("x",)
        args = (batch_size, seed, process_index, process_count)
        if self.train_data is not None:
            data = self.train_data()
            return ArraySource({k: data[k] for k in keys}, *args)

        def sample(rng: np.random.Generator, n: int) -> dict:
            out = self.sample_data(rng, n)
            return {k: np.asarray(out[k], np.float32 if k == "x" else np.int32) for k in keys}

        return SamplerSource(sample, *args)

    def distances(self, x: np.ndarray) -> dict[str, float]:
        """Sample distances of ``x`` (N, ...) to the data distribution; lower is better."""
        x = np.asarray(x, np.float32)
        if not np.isfinite(x).all():
            return {k: float("nan") for k in self.distance_names}
        ref = np.asarray(self.reference["x"], np.float32)
        if not self.is_image:
            n = min(len(ref), 4 * len(x))
            return {
                "sw2": sample_distances.sliced_wasserstein2(x, ref[:n]),
                "mmd": sample_distances.mmd_rbf(x, ref[: min(n, 2000)]),
            }
        out = {}
        for fname, fn in self.features.items():
            mu_r, sig_r = self._ref_stats(fname)
            mu, sig = sample_distances.gaussian_stats(fn(x))
            out[f"fd_{fname}"] = sample_distances.frechet_distance(mu, sig, mu_r, sig_r)
        return out

    @property
    def distance_names(self) -> tuple[str, ...]:
        return ("sw2", "mmd") if not self.is_image else tuple(f"fd_{k}" for k in self.features)

    @property
    def main_distance(self) -> str:
        """The distance the tables lead with."""
        return self.distance_names[0] if not self.is_image else f"fd_{next(iter(self.features))}"

    def _ref_stats(self, fname: str):
        cache = self.__dict__.setdefault("_stats_cache", {})
        if fname not in cache:
            cache[fname] = sample_distances.gaussian_stats(
                self.features[fname](np.asarray(self.reference["x"]))
            )
        return cache[fname]


# ---------------------------------------------------------------------------------------------
# mixtures
# ---------------------------------------------------------------------------------------------


def gmm8_params(radius: float = 2.0, std: float = 0.1) -> dict:
    ang = np.arange(8) * 2 * np.pi / 8
    means = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    return gmm_params(means, np.tile(np.eye(2) * std**2, (8, 1, 1)), np.ones(8))


def checker_params() -> dict:
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    means = np.array([(-1.5 + i, -1.5 + j) for i, j in cells])
    # elongated along alternating axes so the mixture is not isotropic
    covs = np.array([np.diag([0.06, 0.015]) if k % 2 == 0 else np.diag([0.015, 0.06]) for k in range(8)])
    return gmm_params(means, covs, np.ones(8))


def gmm_hd_params(dim: int = 8, num: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    means = 1.5 * rng.standard_normal((num, dim))
    covs = []
    for _ in range(num):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        covs.append(q @ np.diag(rng.uniform(0.02, 0.3, dim)) @ q.T)
    weights = rng.dirichlet(2.0 * np.ones(num))
    return gmm_params(means, np.array(covs), weights)


def _mixture_testbed(name: str, params: dict, path: Path, num_reference: int, seed: int) -> ExactTestbed:
    teacher = gaussian_mixture_teacher(params, path, name=name)
    x, lab = gmm_sample(params, np.random.default_rng(seed + 12345), num_reference)

    def sample_data(rng: np.random.Generator, n: int) -> dict:
        xs, ls = gmm_sample(params, rng, n)
        return {"x": xs, "label": ls}

    return ExactTestbed(name, teacher, {"x": x, "label": lab}, sample_data)


# ---------------------------------------------------------------------------------------------
# image sets through the ideal denoiser
# ---------------------------------------------------------------------------------------------


def _image_testbed(
    name: str, data: dict, path: Path, pca_dim: int, extra_features: dict, train_data: Callable[[], dict]
) -> ExactTestbed:
    from fewstep_jax.metrics.features import PCAFeatures

    x, lab = np.asarray(data["x"], np.float32), np.asarray(data["label"], np.int32)
    teacher = ideal_denoiser_teacher(x, path, labels=lab, name=name)

    def sample_data(rng: np.random.Generator, n: int) -> dict:
        idx = rng.integers(0, len(x), n)
        return {"x": x[idx], "label": lab[idx]}

    feats = {"pca": PCAFeatures.fit(x.reshape(len(x), -1), k=pca_dim)}
    feats.update(extra_features)
    return ExactTestbed(name, teacher, {"x": x, "label": lab}, sample_data, feats, train_data)


def make_testbed(
    name: str,
    path: str | Path = "rf",
    *,
    num_reference: int = 10_000,
    seed: int = 0,
    mnist_path: str | None = None,
    subset: int = 5000,
    pca_dim: int = 32,
) -> ExactTestbed:
    """Builds a testbed by name on the given path (``rf``, ``vp_cosine``, ``ddpm``, ...)."""
    path = get_path(path) if isinstance(path, str) else path
    if name == "gmm8":
        return _mixture_testbed(name, gmm8_params(), path, num_reference, seed)
    if name == "checker":
        return _mixture_testbed(name, checker_params(), path, num_reference, seed)
    if name == "gmm_hd":
        return _mixture_testbed(name, gmm_hd_params(), path, num_reference, seed)
    if name == "digits":
        from fewstep_jax.data import load_digits

        return _image_testbed(name, load_digits(), path, min(pca_dim, 16), {}, load_digits)
    if name == "mnist":
        from fewstep_jax.data import load_dataset
        from fewstep_jax.metrics.features import mnist_features

        train = partial(load_dataset, "mnist", path=mnist_path, split="train")
        data = {k: v[:subset] for k, v in train().items()}
        return _image_testbed(name, data, path, pca_dim, {"mnist": mnist_features}, train)
    raise ValueError(f"unknown testbed {name!r}; expected one of {TESTBEDS}")


# ---------------------------------------------------------------------------------------------
# reference flow map
# ---------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("guidance", "rtol", "atol"))
def _adaptive_solve(teacher, x, label, guidance, rtol, atol):
    # the teacher is an argument (a pytree), so its arrays are not baked into the program; the
    # guidance scale is static so that 1.0 means "no guidance" (an unconditional teacher accepts it)
    return solvers.solve_adaptive(teacher.velocity_fn(label, guidance), x, 1.0, 0.0, rtol, atol)


def reference_flow_map(
    teacher: Teacher,
    x1: np.ndarray,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int = 1000,
) -> tuple[np.ndarray, int]:
    """``Phi(x1, 1, 0)`` by adaptive Dormand-Prince on the exact velocity; returns (x0, max NFE).

    ``x1`` is (N, ...) noise at t = 1 (``teacher.prior`` scale); solved in batches.
    """

    teacher.check_input(np.asarray(x1[:1]))
    guidance = float(guidance)
    outs, nfe = [], 0
    for i in range(0, len(x1), batch_size):
        lab = None if label is None else jnp.asarray(label[i : i + batch_size])
        y, n = _adaptive_solve(teacher, jnp.asarray(x1[i : i + batch_size]), lab, guidance, rtol, atol)
        outs.append(np.asarray(y))
        nfe = max(nfe, int(n))
    return np.concatenate(outs), nfe


__all__ = [
    "IMAGES",
    "LOWDIM",
    "TESTBEDS",
    "ExactTestbed",
    "checker_params",
    "gmm8_params",
    "gmm_hd_params",
    "make_testbed",
    "reference_flow_map",
]
