"""Interpolation paths ``x_t = alpha(t) x0 + sigma(t) eps`` and conversions between predictions.

Time runs over ``t in [0, 1]``: ``t = 0`` is data, ``t = 1`` is noise (docs/methods.md §1.1). A path owns
``alpha``, ``sigma``, their time derivatives, the log signal-to-noise ratio and its inverse, and the
conversions between the five predictions a network can make:

* ``"x0"``: the clean sample, ``"eps"``: the noise,
* ``"flow"``: the ODE velocity ``dx_t/dt = alpha'(t) x0 + sigma'(t) eps``,
* ``"v"``: the diffusion v-prediction ``alpha eps - sigma x0`` (Salimans & Ho),
* ``"score"``: ``grad log p_t(x_t) = -eps / sigma``.

Paths are frozen dataclasses (hashable), so they can be static arguments of jitted functions.
Divisions by ``alpha`` or ``sigma`` (x0 -> eps near t = 0, eps -> x0 near t = 1) use a floor
``DENOM_FLOOR`` (docs/methods.md pitfall 2); ``flow`` and ``v`` convert without any division that
vanishes on [0, 1], so they are the stable carriers near both endpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Prediction = Literal["x0", "eps", "flow", "v", "score"]
PREDICTIONS: tuple[str, ...] = ("x0", "eps", "flow", "v", "score")

# Denominators alpha or sigma are floored here; below it the converted quantity is not
# determined by the inputs anyway (e.g. eps at t = 0).
DENOM_FLOOR = 1e-6


def bcast(t: Array, x: Array) -> Array:
    """Reshapes per-sample times ``t`` of shape (B,) (or a scalar) to broadcast against ``x`` (B, ...)."""
    t = jnp.asarray(t, dtype=x.dtype)
    if t.ndim == 0:
        return t
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"time batch {t.shape} does not match data batch {x.shape}")
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def check_time(t: np.ndarray | float, name: str = "t") -> None:
    """Raises ValueError when a concrete time lies outside [0, 1] (traced values are not checked)."""
    if isinstance(t, jax.core.Tracer):
        return
    arr = np.asarray(t)
    if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0 or np.isnan(arr).any()):
        raise ValueError(
            f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise); got values in "
            f"[{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]"
        )


def _floor(d: Array) -> Array:
    return jnp.where(jnp.abs(d) < DENOM_FLOOR, jnp.where(d < 0, -DENOM_FLOOR, DENOM_FLOOR), d)


@dataclasses.dataclass(frozen=True)
class Path:
    """Base class: subclasses define ``alpha_sigma`` and ``t_from_logsnr``."""

    name: str = "path"
    # alpha', sigma' are evaluated at max(t, deriv_floor): on VP paths sigma ~ sqrt(t) near data,
    # so dsigma/dt is infinite at t = 0 and a solver stage landing exactly there would give inf.
    deriv_floor: float = 0.0

    # ---- schedule -------------------------------------------------------------------------
    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def alpha(self, t: Array) -> Array:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Array) -> Array:
        return self.alpha_sigma(t)[1]

    def derivatives(self, t: Array) -> tuple[Array, Array, Array, Array]:
        """Returns ``(alpha, sigma, dalpha/dt, dsigma/dt)``, elementwise in ``t``."""
        t = jnp.asarray(t, jnp.float32)
        a, s = self.alpha_sigma(t)
        tf = jnp.maximum(t, self.deriv_floor) if self.deriv_floor > 0 else t
        _, (da, ds) = jax.jvp(self.alpha_sigma, (tf,), (jnp.ones_like(tf),))
        return a, s, da, ds

    def logsnr(self, t: Array) -> Array:
        """``lambda(t) = 2 log(alpha / sigma)``, decreasing in t (+inf at data, -inf at pure noise)."""
        a, s = self.alpha_sigma(t)
        return 2.0 * (jnp.log(a) - jnp.log(s))

    def t_from_logsnr(self, lam: Array) -> Array:
        raise NotImplementedError

    @property
    def prior_scale(self) -> float:
        """``sigma(1)``: sampling starts from ``prior_scale * eps`` (alpha(1) x0 is neglected).

        A Python float, usable inside jit (computed eagerly from the static path)."""
        with jax.ensure_compile_time_eval():
            return float(self.sigma(jnp.ones(())))

    # ---- predictions ----------------------------------------------------------------------
    def to_x0_eps(self, pred: Array, kind: str, x: Array, t: Array) -> tuple[Array, Array]:
        """Converts a prediction of ``kind`` at ``(x, t)`` to ``(x0, eps)``; shapes of ``x``."""
        a, s, da, ds = (bcast(v, x) for v in self.derivatives(t))
        if kind == "x0":
            return pred, (x - a * pred) / _floor(s)
        if kind == "eps":
            return (x - s * pred) / _floor(a), pred
        if kind == "flow":
            det = a * ds - s * da  # > 0 for every path here: (x, v) -> (x0, eps) is invertible
            return (ds * x - s * pred) / det, (a * pred - da * x) / det
        if kind == "v":
            n2 = a * a + s * s
            return (a * x - s * pred) / n2, (s * x + a * pred) / n2
        if kind == "score":
            eps = -s * pred
            return (x - s * eps) / _floor(a), eps
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")

    def from_x0_eps(self, kind: str, x0: Array, eps: Array, t: Array) -> Array:
        """The prediction of ``kind`` implied by ``(x0, eps)`` at time ``t``."""
        a, s, da, ds = (bcast(v, x0) for v in self.derivatives(t))
        if kind == "x0":
            return x0
        if kind == "eps":
            return eps
        if kind == "flow":
            return da * x0 + ds * eps
        if kind == "v":
            return a * eps - s * x0
        if kind == "score":
            return -eps / _floor(s)
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")

    def convert(self, pred: Array, src: str, dst: str, x: Array, t: Array) -> Array:
        """Converts a prediction between kinds at ``(x, t)``."""
        if src == dst:
            return pred
        x0, eps = self.to_x0_eps(pred, src, x, t)
        return self.from_x0_eps(dst, x0, eps, t)

    def interpolate(self, x0: Array, eps: Array, t: Array) -> Array:
        """``x_t = alpha(t) x0 + sigma(t) eps``."""
        a, s = self.alpha_sigma(t)
        return bcast(a, x0) * x0 + bcast(s, x0) * eps

    # ---- other paths ----------------------------------------------------------------------
    def equivalent_time(self, t: Array, other: Path) -> Array:
        """The time of ``other`` with the same log-SNR as ``t`` on this path."""
        return other.t_from_logsnr(self.logsnr(t))

    def rescale_to(self, x: Array, t: Array, other: Path) -> tuple[Array, Array]:
        """Maps a state ``(x, t)`` of this path to the same point ``(x', t')`` of ``other``.

        Paths with equal log-SNR differ only by a scale: ``x' = x * alpha'(t') / alpha(t)``.
        """
        t2 = self.equivalent_time(t, other)
        a1 = self.alpha(t)
        a2 = other.alpha(t2)
        s1 = self.sigma(t)
        s2 = other.sigma(t2)
        # scale by alpha where alpha dominates, by sigma otherwise (both ratios agree exactly)
        ratio = jnp.where(a1 > s1, a2 / _floor(a1), s2 / _floor(s1))
        return x * bcast(ratio, x), t2


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Path):
    """``alpha = 1 - t``, ``sigma = t`` (rectified flow / flow matching, SD3 convention)."""

    name: str = "rf"

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def t_from_logsnr(self, lam):
        return jax.nn.sigmoid(-0.5 * jnp.asarray(lam, jnp.float32))


@dataclasses.dataclass(frozen=True)
class VPCosine(Path):
    """Variance preserving, ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``; pure noise at t = 1."""

    name: str = "vp_cosine"

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        # cos(pi t/2) written as sin(pi (1-t)/2): float32 cos(pi/2) is -4e-8, this is 0 at t = 1
        return jnp.sin(0.5 * jnp.pi * (1.0 - t)), jnp.sin(0.5 * jnp.pi * t)

    def t_from_logsnr(self, lam):
        return (2.0 / jnp.pi) * jnp.arctan(jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class VPLinear(Path):
    """Variance preserving with continuous linear beta (score-SDE): ``log abar = -(b0 t + (b1-b0) t^2/2)``."""

    name: str = "vp_linear"
    deriv_floor: float = 1e-5
    beta_min: float = 0.1
    beta_max: float = 20.0

    def _log_abar(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def alpha_sigma(self, t):
        la = self._log_abar(jnp.asarray(t, jnp.float32))
        return jnp.exp(0.5 * la), jnp.sqrt(-jnp.expm1(la))

    def t_from_logsnr(self, lam):
        c = -jax.nn.log_sigmoid(jnp.asarray(lam, jnp.float32))  # -log abar >= 0
        q = 0.5 * (self.beta_max - self.beta_min)
        # positive root of q t^2 + b0 t - c = 0, in the cancellation-free form
        return 2.0 * c / (self.beta_min + jnp.sqrt(self.beta_min**2 + 4.0 * q * c))


def ddpm_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float):
    """The discrete DDPM beta table of diffusers (``linear`` or ``scaled_linear``), float64."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown DDPM beta schedule {schedule!r}; expected 'linear' or 'scaled_linear'")


@dataclasses.dataclass(frozen=True)
class DDPM(Path):
    """A discrete 1000-step DDPM schedule made continuous.

    Integer timestep ``k in {0..T-1}`` sits at ``t_k = (k + 1) / T`` (so ``t = 0`` is clean data,
    ``abar = 1``), and ``log abar(t)`` is linear between grid points. Hence
    ``alpha(t_k)^2 == alphas_cumprod[k]`` exactly, and ``t <-> k`` converts without loss.
    Defaults are Stable Diffusion's ``scaled_linear`` 0.00085..0.012 (TCD/LCM).
    """

    name: str = "ddpm"
    deriv_floor: float = 1e-5
    schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def alphas_cumprod(self) -> np.ndarray:
        betas = ddpm_betas(self.schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        return np.cumprod(1.0 - betas)

    def _tables(self):
        la = np.concatenate([[0.0], np.log(self.alphas_cumprod())])
        ts = np.arange(self.num_train_timesteps + 1, dtype=np.float64) / self.num_train_timesteps
        return jnp.asarray(ts, jnp.float32), jnp.asarray(la, jnp.float32)

    def alpha_sigma(self, t):
        ts, la = self._tables()
        log_abar = jnp.interp(jnp.asarray(t, jnp.float32), ts, la)
        return jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))

    def t_from_logsnr(self, lam):
        ts, la = self._tables()
        # logsnr = la - log(1 - abar) decreases along ts; interp needs increasing abscissae
        lam_tab = la - jnp.log(-jnp.expm1(jnp.minimum(la, -1e-12)))
        return jnp.interp(jnp.asarray(lam, jnp.float32), lam_tab[::-1], ts[::-1])

    def timestep_to_t(self, k):
        """Integer (or fractional) DDPM timestep -> continuous time, ``t = (k + 1) / T``."""
        return (jnp.asarray(k, jnp.float32) + 1.0) / self.num_train_timesteps

    def t_to_timestep(self, t):
        """Continuous time -> DDPM timestep ``k = t T - 1`` (integer on the grid, -1 at t = 0)."""
        return jnp.asarray(t, jnp.float32) * self.num_train_timesteps - 1.0


@dataclasses.dataclass(frozen=True)
class VE(Path):
    """EDM / variance exploding: ``alpha = 1``, ``sigma = sigma_max * t`` (EDM's sigma(t) = t, rescaled)."""

    name: str = "ve"
    sigma_max: float = 80.0

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), self.sigma_max * t

    def t_from_logsnr(self, lam):
        return jnp.clip(jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32)) / self.sigma_max, 0.0, 1.0)


_PATHS = {
    "rf": RectifiedFlow,
    "vp_cosine": VPCosine,
    "vp_linear": VPLinear,
    "ddpm": DDPM,
    # the original DDPM / diffusers-default table (linear betas 1e-4..0.02; TDM's demo, CIFAR-10
    # DDPM); a DDPM path like "ddpm" (same class and .name), so every DDPM-only code path takes it
    "ddpm_linear": functools.partial(DDPM, schedule="linear", beta_start=1e-4, beta_end=0.02),
    "ve": VE,
}


def get_path(name: str, **kwargs) -> Path:
    """Builds a path by name (``config.testbed.path``): ``rf``, ``vp_cosine``, ``vp_linear``,
    ``ddpm`` (Stable Diffusion's scaled_linear 0.00085..0.012; ``schedule=`` etc. override),
    ``ddpm_linear`` (linear betas 1e-4..0.02, diffusers' DDPMScheduler default), ``ve``."""
    if name not in _PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(_PATHS)}")
    return _PATHS[name](**kwargs)


def edm_sigma(path: Path, t: Array) -> Array:
    """EDM noise level ``sigma / alpha`` of time ``t`` (inf at pure noise)."""
    a, s = path.alpha_sigma(t)
    return s / a


def t_from_edm_sigma(path: Path, sigma: Array) -> Array:
    """Inverse of :func:`edm_sigma`."""
    return path.t_from_logsnr(-2.0 * jnp.log(jnp.asarray(sigma, jnp.float32)))


__all__ = [
    "DDPM",
    "PREDICTIONS",
    "VE",
    "Path",
    "RectifiedFlow",
    "VPCosine",
    "VPLinear",
    "bcast",
    "check_time",
    "ddpm_betas",
    "edm_sigma",
    "get_path",
    "t_from_edm_sigma",
]
