"""FID and KID with the FID Inception-v3 in JAX.

FID (README section)
--------------------
**Network.** pytorch-fid's port (``pt_inception-2015-12-05-6726825d.pth``) of the TensorFlow
graph ``inception-2015-12-05`` that the original FID code (TTUR) and OpenAI's ADM evaluator use,
re-implemented in Flax (``metrics/inception.py``: FIDInceptionA/C/E blocks, average pools
that exclude padding, max pool in the last block, 2048-d pool3 features). Nothing is downloaded:
you give the weights file and convert it once (needs torch)::

    python -m fewstep_jax.metrics.inception \\
        --convert pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

**Preprocessing** (``to_uint8`` then ``preprocess``), chosen to match pytorch-fid on saved PNGs:

1. samples (B, H, W, C) float in [-1, 1] are quantised exactly as saving PNGs would:
   ``uint8(round(clip((x + 1) * 127.5, 0, 255)))`` in float32, round-half-to-even. uint8 inputs
   (e.g. real data) are taken as they are.
2. uint8 -> float32, resize to 299x299 with ``jax.image.resize(method="bilinear",
   antialias=False)``: half-pixel centres with edge clamping, i.e. the same as PyTorch's
   ``F.interpolate(mode="bilinear", align_corners=False)`` that pytorch-fid uses (pinned by a
   test). For upsampling (CIFAR-10 32 -> 299) ``antialias`` makes no difference; for
   downsampling, antialias=False is pytorch-fid's (aliased) choice. TensorFlow's graph instead
   resizes with TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres: source
   coordinate = dst * in/out), which samples the image shifted by up to half a source pixel.
3. grayscale (C = 1) is repeated to 3 channels; values are mapped to [-1, 1] by ``x / 127.5 - 1``
   (pytorch-fid's ``2 * (x / 255) - 1``; to our knowledge the TF graph uses ``(x - 128) / 128``).

**Statistics and distance.** ``mu`` = mean and ``sigma`` = unbiased covariance (``np.cov``) of
the pool3 features in float64; the Frechet distance uses ``scipy.linalg.sqrtm`` with pytorch-fid's
1e-6 diagonal offset when the product is singular (``metrics.frechet_distance``). Reference
statistics are ``.npz`` files with keys ``mu`` (2048,) and ``sigma`` (2048, 2048), the format
of pytorch-fid's ``--save-stats`` and of OpenAI's ADM reference batches (extra keys ignored).

**How the numbers compare to the papers'.** Same network and weights as the TF FID; the
remaining differences are the resize (above), the input scaling and library numerics.
pytorch-fid reports agreement with TF FID to about 1e-3 relative (0.08 absolute) on LSUN; the
CIFAR-10 numbers in docs/methods.md §6 are FID-50k (50 000 samples) against the CIFAR-10
*training* set (50 000 images), to our knowledge mostly computed with the TF graph or NVIDIA's
translation of it. So compare to the papers at the level of a few percent, not the second
decimal, and compare our own runs with each other exactly: always the same weights, this code
and the same reference file, computed with this code (not the papers' downloaded statistics)::

    # once: reference statistics of CIFAR-10 train (tfds data must already be on disk)
    python -m fewstep_jax.metrics.fid stats --inception inception_fid.npz \\
        --tfds cifar10:train --out cifar10_train_fid_stats.npz
    # a sample file (.npz with uint8 NHWC images under arr_0, ADM's format, or .npy):
    python -m fewstep_jax.metrics.fid score --inception inception_fid.npz \\
        --images samples.npz --ref cifar10_train_fid_stats.npz

FID-50k needs 50 000 samples; fewer samples bias FID upwards. The 2048-d ``sqrtm`` alone takes
about 80 s on this shared 2-core CPU (seconds on a many-core host). KID (``kid``) is the unbiased
squared MMD with the cubic kernel (x.y / d + 1)^3, averaged over random subsets.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fewstep_jax.metrics.inception import (
    FEATURE_DIM,
    INPUT_SIZE,
    inception_apply,
    load_inception_params,
)
from fewstep_jax.metrics.sample_distances import frechet_distance, gaussian_stats, kid

__all__ = [
    "FIDScorer",
    "compute_activations",
    "compute_statistics",
    "fid",
    "fid_from_activations",
    "fid_from_stats",
    "kid",
    "load_reference_stats",
    "preprocess",
    "save_reference_stats",
    "to_uint8",
]

DEFAULT_BATCH_SIZE = 256


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (B, H, W, C) with B >= 1 and C in (1, 3), got {images.shape}")


def to_uint8(images: Any) -> np.ndarray:
    """(B, H, W, C) float in [-1, 1] -> uint8 as a saved PNG: round(clip((x + 1) * 127.5, 0, 255)).

    uint8 input is returned unchanged. Rounding is numpy's half-to-even, in float32.
    """
    images = np.asarray(images)
    _check_images(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    x = images.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    return np.rint(np.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 (B, H, W, C), C in (1, 3) -> (B, size, size, 3) float32 in [-1, 1], Inception input.

    Bilinear resize with half-pixel centres and no antialiasing (= PyTorch's F.interpolate
    bilinear, align_corners=False); grayscale repeated to 3 channels; x / 127.5 - 1.
    """
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)
    if c == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x / 127.5 - 1.0


def _activations_impl(params: Mapping, images_u8: jax.Array, size: int) -> jax.Array:
    return inception_apply(params, preprocess(images_u8, size))


_activations = jax.jit(_activations_impl, static_argnames=("size",))


@functools.cache
def _sharded_activations(mesh: Mesh):
    # Replicated output: every host can read all features (multi-host safe, 8 KB per image).
    return jax.jit(_activations_impl, static_argnames=("size",), out_shardings=NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------
# Activations and statistics
# ---------------------------------------------------------------------------------------------


def compute_activations(
    params: Mapping,
    images: Any,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: Mesh | None = None,
    *,
    resize_to: int = INPUT_SIZE,
) -> np.ndarray:
    """Pool3 features (N, 2048) float32 of images (N, H, W, C): float in [-1, 1] or uint8.

    Batches of ``batch_size`` (the last one zero-padded, so one compilation) go through one jitted
    preprocess + Inception. With a mesh, each batch is sharded over all its devices along the
    batch axis (params replicated, features gathered on every device); ``batch_size`` must then
    be a multiple of the mesh size. On several hosts every host passes the same images.
    ``resize_to`` is 299 for FID; a smaller size (>= 75) is only for cheap tests.
    """
    images = np.asarray(images)
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mesh is not None:
        if batch_size % mesh.size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh size {mesh.size}")
        data_sharding = NamedSharding(mesh, P(mesh.axis_names))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        apply = _sharded_activations(mesh)
    else:
        params = jax.device_put(params)
        apply = _activations
    n = images.shape[0]
    feats, pending = [], None
    for start in range(0, n, batch_size):
        batch = to_uint8(images[start : start + batch_size])
        real = batch.shape[0]
        if real < batch_size:
            pad = np.zeros((batch_size - real, *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        batch = jax.device_put(batch, data_sharding) if mesh is not None else jnp.asarray(batch)
        out = apply(params, batch, resize_to)
        # Fetch the previous batch only after dispatching this one, so host and device overlap.
        if pending is not None:
            feats.append(np.asarray(pending[0])[: pending[1]])
        pending = (out, real)
    feats.append(np.asarray(pending[0])[: pending[1]])
    return np.concatenate(feats).astype(np.float32)


def compute_statistics(activations: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64: mean and unbiased covariance of activations (N, D)."""
    return gaussian_stats(activations)


def save_reference_stats(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
    """Write ``{mu: (D,), sigma: (D, D)}`` float64 to an .npz at exactly ``path``."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    with open(path, "wb") as f:  # an open file keeps np.savez from appending ".npz"
        np.savez(f, mu=mu, sigma=sigma)


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from an .npz with keys ``mu`` and ``sigma`` (others ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics {path!r} not found")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path!r} lacks key(s) {missing}; it has {sorted(data.files)}")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path!r}: expected mu (D,) and sigma (D, D), got {mu.shape}, {sigma.shape}")
    return mu, sigma


def fid_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^{1/2}) (the FID when the stats
    are Inception pool3 statistics)."""
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid_from_activations(activations: Any, mu_ref: Any, sigma_ref: Any) -> float:
    """The Frechet distance of activations (N, D) to reference (mu (D,), sigma (D, D)).

    With N <= D samples (e.g. a training-time FID on 1000 samples) the sample covariance is
    S = A A^T with A = (X - mean)^T / sqrt(N - 1) of rank < N, and the nonzero eigenvalues of
    S sigma_ref are those of the N x N matrix A^T sigma_ref A: the same value as
    :func:`fid_from_stats` from one N x N eigendecomposition instead of two D x D ones (2048-d:
    seconds on a 2-core CPU). Larger N goes through :func:`fid_from_stats`.
    """
    x = np.asarray(activations, np.float64)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or mu_ref.shape != (x.shape[1],):
        raise ValueError(f"expected activations (N >= 2, D) and mu_ref (D,), got {x.shape}, {mu_ref.shape}")
    n, d = x.shape
    if n > d:
        return fid_from_stats(*compute_statistics(x), mu_ref, sigma_ref)
    mu = x.mean(0)
    a = (x - mu).T / np.sqrt(n - 1)  # (D, N)
    m = a.T @ (0.5 * (sigma_ref + sigma_ref.T)) @ a
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None))))
    diff = mu - mu_ref
    d2 = diff @ diff + np.sum(a * a) + np.trace(sigma_ref) - 2.0 * tr_covmean
    return float(max(d2, 0.0))


def fid(
    params: Mapping,
    images: Any,
    ref_stats: tuple[Any, Any] | str | os.PathLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: Mesh | None = None,
) -> float:
    """FID of images (N, H, W, C) (float in [-1, 1] or uint8) against reference (mu, sigma) or
    the path of a reference .npz."""
    if isinstance(ref_stats, str | os.PathLike):
        ref_stats = load_reference_stats(ref_stats)
    mu_ref, sigma_ref = ref_stats
    mu, sigma = compute_statistics(compute_activations(params, images, batch_size, mesh))
    if mu.shape != np.shape(mu_ref):
        raise ValueError(f"reference stats have dimension {np.shape(mu_ref)}, features {mu.shape}")
    return fid_from_stats(mu, sigma, mu_ref, sigma_ref)


@dataclasses.dataclass(frozen=True, eq=False)
class FIDScorer:
    """FID of sample batches against fixed reference statistics, the weights loaded once (the
    evaluation of a training run). Runs on this process's local devices only, so it is safe to
    call from one process of a multi-host run (e.g. the end-of-run report on process 0)."""

    params: Mapping
    mu: np.ndarray  # (2048,) reference mean
    sigma: np.ndarray  # (2048, 2048) reference covariance
    batch_size: int = DEFAULT_BATCH_SIZE
    resize_to: int = INPUT_SIZE  # 299 for FID; smaller (>= 75) only for cheap tests

    @classmethod
    def from_files(
        cls,
        inception: str | os.PathLike,
        reference: str | os.PathLike,
        batch_size: int = DEFAULT_BATCH_SIZE,
        resize_to: int = INPUT_SIZE,
    ) -> FIDScorer:
        """Loads converted Inception weights (.npz) and reference statistics (.npz mu, sigma)."""
        mu, sigma = load_reference_stats(reference)
        if mu.shape != (FEATURE_DIM,):
            raise ValueError(
                f"FID reference {os.fspath(reference)!r} has dimension {mu.shape}, expected "
                f"({FEATURE_DIM},) Inception pool3 statistics"
            )
        return cls(load_inception_params(inception), mu, sigma, int(batch_size), int(resize_to))

    def __call__(self, images: Any) -> float:
        """FID of images (N, H, W, C) in [-1, 1] (N >= 2); NaN when any value is not finite."""
        images = np.asarray(images)
        if images.dtype != np.uint8 and not np.isfinite(images).all():
            return float("nan")
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        batch_size = -(-self.batch_size // mesh.size) * mesh.size  # a multiple of the mesh size
        acts = compute_activations(self.params, images, batch_size, mesh, resize_to=self.resize_to)
        return fid_from_activations(acts, self.mu, self.sigma)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def load_images(path: str | os.PathLike) -> np.ndarray:
    """Images (N, H, W, C) from an .npy or an .npz (key ``arr_0``, ADM's sample format, or the
    only key)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} not found")
    if path.endswith(".npy"):
        return np.load(path)
    with np.load(path) as data:
        if "arr_0" in data.files:
            return data["arr_0"]
        if len(data.files) == 1:
            return data[data.files[0]]
        raise ValueError(f"{path!r} has keys {sorted(data.files)}; expected 'arr_0' or one key")


def load_tfds_images(spec: str, data_dir: str | None = None) -> np.ndarray:
    """All images of a tfds split already on disk, e.g. ``cifar10:train`` -> uint8 (N, H, W, C)."""
    from fewstep_jax.data.tfds_source import import_tfds

    tfds = import_tfds()  # optional (the [tfds] extra), only for the command line
    name, _, split = spec.partition(":")
    ds = tfds.load(name, split=split or "train", data_dir=data_dir, download=False, batch_size=-1)
    return np.asarray(tfds.as_numpy(ds)["image"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewstep_jax.metrics.fid")
    sub = parser.add_subparsers(dest="cmd", required=True)
    stats = sub.add_parser("stats", help="write reference statistics {mu, sigma} of a data set")
    score = sub.add_parser("score", help="FID of an image file against reference statistics")
    for p in (stats, score):
        p.add_argument("--inception", required=True, help="inception_fid.npz (see --convert)")
        p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
        p.add_argument("--images", help=".npz (arr_0) or .npy of NHWC images, uint8 or [-1, 1]")
    stats.add_argument("--tfds", help="tfds split on disk instead of --images, e.g. cifar10:train")
    stats.add_argument("--data-dir", help="tfds data_dir")
    stats.add_argument("--out", required=True, help="output .npz with keys mu, sigma")
    score.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma)")
    args = parser.parse_args(argv)

    if args.cmd == "stats" and args.tfds:
        images = load_tfds_images(args.tfds, args.data_dir)
    elif args.images:
        images = load_images(args.images)
    else:
        parser.error("give --images (or --tfds for stats)")
    params = load_inception_params(args.inception)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_size = -(-args.batch_size // mesh.size) * mesh.size  # round up to the mesh size
    acts = compute_activations(params, images, batch_size, mesh)
    mu, sigma = compute_statistics(acts)
    if args.cmd == "stats":
        save_reference_stats(args.out, mu, sigma)
        print(f"wrote mu {mu.shape}, sigma {sigma.shape} of {len(acts)} images to {args.out}")
    else:
        value = fid_from_stats(mu, sigma, *load_reference_stats(args.ref))
        print(f"FID {value:.4f} ({len(acts)} images, {FEATURE_DIM}-d features)")


if __name__ == "__main__":
    main()
