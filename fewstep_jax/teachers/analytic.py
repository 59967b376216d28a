"""Analytic teachers: exact marginal velocities, no training (docs/design.md "Exact testbeds").

* :func:`gaussian_mixture_teacher`: data ``sum_k w_k N(mu_k, Sigma_k)`` in any dimension. On any
  path, ``x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so the posterior means
  ``E[x0 | x_t]`` and ``E[eps | x_t]`` are closed-form mixtures of Gaussian conditionals; with
  ``Sigma_k = U diag(lam) U^T`` every time costs one projection.
* :func:`ideal_denoiser_teacher`: the empirical distribution of a finite set (the optimal denoiser
  of the data set, a mixture of deltas): ``E[x0 | x_t] = softmax_i(-|x_t - alpha x_i|^2 / 2 sigma^2) x_i``.

Both return the velocity ``alpha' E[x0|x_t] + sigma' E[eps|x_t]`` (prediction ``"flow"``), the one
carrier that converts back to ``(x0, eps)`` without vanishing denominators. Class-conditional:
each component / example has a label; label ``-1`` (null) is the full mixture, so classifier-free
guidance can be exercised exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import Path, bcast
from fewstep_jax.teachers.base import Teacher

Array = jax.Array

# sigma floor of the ideal denoiser's eps = (x - alpha x0) / sigma; the clean end t = 0 is
# never evaluated by the samplers except as a Heun/RK4 stage, where this keeps it finite.
_IDEAL_SIGMA_FLOOR = 1e-4


def _label_mask(labels: Array, label: Array | None) -> Array:
    """(B, K) additive log-mask: 0 where component k has the sample's label (or label is null)."""
    if label is None:
        return jnp.zeros((1, labels.shape[0]), jnp.float32)
    keep = (label[:, None] < 0) | (labels[None, :] == label[:, None])
    return jnp.where(keep, 0.0, -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Gaussian mixture
# ---------------------------------------------------------------------------------------------


def gmm_posterior(params: dict, path: Path, x: Array, t: Array, label: Array | None = None):
    """``(E[x0|x_t], E[eps|x_t])`` of a Gaussian mixture on ``path``; x (B, D), t (B,)."""
    mu, U, lam = params["means"], params["eigvecs"], params["eigvals"]  # (K,D) (K,D,D) (K,D)
    a, s = path.alpha_sigma(t)  # (B,)
    a_, s_ = a[:, None, None], s[:, None, None]
    m = x[:, None, :] - a_ * mu[None]  # (B,K,D)
    z = jnp.einsum("bkd,kde->bke", m, U)  # coordinates in each component's eigenbasis
    var = a_ * a_ * lam[None] + s_ * s_  # (B,K,D) marginal variances of x_t | k
    logp = -0.5 * jnp.sum(z * z / var + jnp.log(2 * jnp.pi * var), axis=-1)  # (B,K)
    logits = params["log_weights"][None] + logp + _label_mask(params["labels"], label)
    r = jax.nn.softmax(logits, axis=-1)  # (B,K)
    x0_k = mu[None] + jnp.einsum("bke,kde->bkd", a_ * lam[None] * z / var, U)
    eps_k = jnp.einsum("bke,kde->bkd", s_ * z / var, U)
    return jnp.einsum("bk,bkd->bd", r, x0_k), jnp.einsum("bk,bkd->bd", r, eps_k)


def _velocity_from_posterior(path: Path, x0: Array, eps: Array, t: Array) -> Array:
    return path.from_x0_eps("flow", x0, eps, t)


def _gmm_apply_fn(path: Path):
    def apply(params, x, t, label):
        x0, eps = gmm_posterior(params, path, x, t, label)
        return _velocity_from_posterior(path, x0, eps, t)

    return apply


class _ApplyCache:
    """Keeps one apply function per path so equal teachers share jit caches (static field)."""

    def __init__(self, factory):
        self.factory, self.cache = factory, {}

    def __call__(self, path: Path):
        if path not in self.cache:
            self.cache[path] = self.factory(path)
        return self.cache[path]


_gmm_apply = _ApplyCache(_gmm_apply_fn)


def gmm_params(means, covs, weights, labels=None) -> dict:
    """Packs a mixture: means (K, D), covs (K, D, D) SPD, weights (K,) > 0, labels (K,) int."""
    means = np.asarray(means, np.float64)
    covs = np.asarray(covs, np.float64)
    weights = np.asarray(weights, np.float64)
    K, D = means.shape
    if covs.shape != (K, D, D) or weights.shape != (K,):
        raise ValueError(
            f"mixture shapes disagree: means {means.shape}, covs {covs.shape}, weights {weights.shape}"
        )
    if np.any(weights <= 0):
        raise ValueError("mixture weights must be positive")
    lam, U = np.linalg.eigh(0.5 * (covs + np.transpose(covs, (0, 2, 1))))
    if np.any(lam <= 0):
        raise ValueError("mixture covariances must be positive definite")
    labels = np.arange(K) if labels is None else np.asarray(labels)
    return {
        "means": jnp.asarray(means, jnp.float32),
        "eigvecs": jnp.asarray(U, jnp.float32),
        "eigvals": jnp.asarray(lam, jnp.float32),
        "log_weights": jnp.asarray(np.log(weights / weights.sum()), jnp.float32),
        "labels": jnp.asarray(labels, jnp.int32),
    }


def gaussian_mixture_teacher(
    params: dict, path: Path, name: str = "gmm", conditional: bool = True
) -> Teacher:
    """A teacher whose data distribution is the mixture ``params`` (see :func:`gmm_params`)."""
    num_classes = int(np.max(np.asarray(params["labels"]))) + 1 if conditional else 0
    return Teacher(
        params=params,
        apply=_gmm_apply(path),
        path=path,
        prediction="flow",
        data_shape=(int(params["means"].shape[1]),),
        num_classes=num_classes,
        name=name,
    )


def gmm_sample(params: dict, rng: np.random.Generator, n: int, label: int | None = None):
    """Exact samples ``(x (n, D) float32, label (n,) int32)`` of the mixture (numpy, at the edge)."""
    logw = np.asarray(params["log_weights"], np.float64)
    labels = np.asarray(params["labels"])
    if label is not None and label >= 0:
        logw = np.where(labels == label, logw, -np.inf)
    w = np.exp(logw - logw.max())
    k = rng.choice(len(w), size=n, p=w / w.sum())
    U = np.asarray(params["eigvecs"], np.float64)[k]
    lam = np.asarray(params["eigvals"], np.float64)[k]
    z = rng.standard_normal((n, lam.shape[1])) * np.sqrt(lam)
    x = np.asarray(params["means"], np.float64)[k] + np.einsum("nde,ne->nd", U, z)
    return x.astype(np.float32), labels[k].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# ideal denoiser of a finite set
# ---------------------------------------------------------------------------------------------


def ideal_posterior(params: dict, path: Path, x: Array, t: Array, label: Array | None = None):
    """``(E[x0|x_t], E[eps|x_t])`` for the empirical distribution of ``params['data']`` (N, D); x (B, ...)."""
    data = params["data"]  # (N, D)
    xf = x.reshape(x.shape[0], -1)
    a, s = path.alpha_sigma(t)
    s = jnp.maximum(s, _IDEAL_SIGMA_FLOOR)
    # |x - a x_i|^2 = |x|^2 - 2a x.x_i + a^2 |x_i|^2; |x|^2 is constant over i and drops out
    logits = (a[:, None] * (xf @ data.T) - 0.5 * (a * a)[:, None] * params["sq_norms"][None]) / (s * s)[
        :, None
    ]
    logits = logits + _label_mask(params["labels"], label)
    x0 = (jax.nn.softmax(logits, axis=-1) @ data).reshape(x.shape)
    eps = (x - bcast(a, x) * x0) / bcast(s, x)
    return x0, eps


def _ideal_apply_fn(path: Path):
    def apply(params, x, t, label):
        x0, eps = ideal_posterior(params, path, x, t, label)
        return _velocity_from_posterior(path, x0, eps, t)

    return apply


_ideal_apply = _ApplyCache(_ideal_apply_fn)


def ideal_denoiser_teacher(
    data: np.ndarray, path: Path, labels: np.ndarray | None = None, name: str = "ideal"
) -> Teacher:
    """The exact teacher of the empirical distribution of ``data`` (N, ...) (e.g. images NHWC)."""
    data = np.asarray(data, np.float32)
    flat = data.reshape(data.shape[0], -1)
    params = {
        "data": jnp.asarray(flat),
        "sq_norms": jnp.asarray(np.sum(flat.astype(np.float64) ** 2, axis=1), jnp.float32),
        "labels": jnp.asarray(np.zeros(len(data)) if labels is None else labels, jnp.int32),
    }
    return Teacher(
        params=params,
        apply=_ideal_apply(path),
        path=path,
        prediction="flow",
        data_shape=tuple(data.shape[1:]),
        num_classes=0 if labels is None else int(np.max(labels)) + 1,
        name=name,
        singular_at_zero=True,  # eps = (x - alpha x0) / sigma: no density, sigma = 0 at the data
    )


__all__ = [
    "gaussian_mixture_teacher",
    "gmm_params",
    "gmm_posterior",
    "gmm_sample",
    "ideal_denoiser_teacher",
    "ideal_posterior",
]
