"""The integer-timestep DDPM conventions the diffusers schedulers share (``schedules/*_scheduler.py``).

Timesteps are integers ``0..T-1`` of the discrete DDPM schedule ``alphas_cumprod``
(``paths.DDPM.alphas_cumprod``, or :func:`beta_table` for every beta option of a diffusers scheduler
config); a model is a function ``model_fn(x (B, ...), timestep int) -> (B, ...)`` predicting
``epsilon``, ``sample`` (x0) or ``v_prediction``, the names diffusers uses. All injected noise is
explicit. :class:`X0Limit` is the schedulers' optional clipping / dynamic thresholding of the
predicted x0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import DDPM

Array = jax.Array
ModelFn = Callable[[Array, int], Array]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DDPM_ONLY_BETA_SCHEDULES = ("sigmoid", "laplace")  # DDPMScheduler's further tables


def alphas_cumprod(path: DDPM | None = None) -> np.ndarray:
    """``alphas_cumprod`` (T,) float32 of a DDPM path (default: Stable Diffusion's scaled_linear)."""
    path = DDPM() if path is None else path
    if not isinstance(path, DDPM):
        raise ValueError(f"integer-timestep scheduling needs a DDPM path, got {path.name!r}")
    return path.alphas_cumprod().astype(np.float32)


def beta_table(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The (T,) float32 betas a diffusers scheduler builds from these config options.

    ``squaredcos_cap_v2`` is GLIDE's cosine ``abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)`` with
    each beta capped at 0.999; ``rescale_betas_zero_snr`` shifts and scales ``sqrt(abar)`` so the last
    timestep has zero SNR and the first keeps its value (Lin et al. 2023, Algorithm 1). DDPMScheduler
    alone also takes ``sigmoid`` (GeoDiff: ``beta_start + (beta_end - beta_start) sigmoid(u)``, u
    evenly in [-6, 6]) and ``laplace`` (``abar = sqrt(snr / (1 + snr))`` of a Laplace log-SNR, capped
    like the cosine).
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule in ("squaredcos_cap_v2", "laplace"):

        def cosine(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        def laplace(t: float) -> float:
            snr = math.exp(-0.5 * math.copysign(1.0, 0.5 - t) * math.log(1.0 - 2.0 * abs(0.5 - t) + 1e-6))
            return math.sqrt(snr / (1.0 + snr))

        abar = cosine if beta_schedule == "squaredcos_cap_v2" else laplace
        T = num_train_timesteps
        betas = np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    elif beta_schedule == "sigmoid":
        u = np.linspace(-6.0, 6.0, num_train_timesteps, dtype=np.float64)
        betas = (beta_end - beta_start) / (1.0 + np.exp(-u)) + beta_start
    else:
        names = BETA_SCHEDULES + DDPM_ONLY_BETA_SCHEDULES
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {names}")
    betas = betas.astype(np.float32)
    if rescale_betas_zero_snr:
        root = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        ab = root**2
        betas = (1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])).astype(np.float32)
    return betas


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    """``alphas_cumprod`` (T,) float32 of float32 betas (accumulated in float64, as torch's CPU cumprod)."""
    alphas = 1.0 - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def dynamic_threshold(x0: Array, ratio: float = 0.995, max_value: float = 1.0) -> Array:
    """Imagen's dynamic thresholding of a batch (B, ...): per sample, ``s`` is the ``ratio`` quantile
    of ``|x0|`` (linear interpolation, as ``torch.quantile``) clamped to ``[1, max_value]``; returns
    ``clip(x0, -s, s) / s``."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    # clamp(min=1, max=max_value): jnp.clip, like torch.clamp, returns max_value when it is below 1
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


@dataclasses.dataclass(frozen=True)
class X0Limit:
    """The schedulers' step 4, applied to the predicted x0: dynamic ``thresholding`` when on, else
    clipping to ``[-clip_sample_range, clip_sample_range]`` when ``clip_sample``, else nothing.
    Hashable (a static jit argument)."""

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @property
    def active(self) -> bool:
        return bool(self.thresholding or self.clip_sample)

    def __call__(self, x0: Array) -> Array:
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0


def limit_x0(x0: Array, x0_limit: X0Limit | None) -> Array:
    return x0 if x0_limit is None else x0_limit(x0)


def to_x0_eps(model_output: Array, sample: Array, abar_t: Array, prediction_type: str):
    """``(x0, eps)`` from a model output of a diffusers ``prediction_type`` at ``abar_t``."""
    a, b = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def noise_at(noises, i: int, n_needed: int, name: str):
    if noises is None:
        raise ValueError(f"{name} with re-noising needs the injected noise: {n_needed} arrays shaped like x")
    if len(noises) < n_needed:
        raise ValueError(f"{name} needs {n_needed} injected noise arrays, got {len(noises)}")
    return noises[i]


def aligned_origin(original_steps: int, num_train_timesteps: int, strength: float) -> np.ndarray:
    if original_steps > num_train_timesteps:
        raise ValueError(
            f"original_inference_steps {original_steps} exceeds num_train_timesteps {num_train_timesteps}"
        )
    k = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1


def pick(origin: np.ndarray, num_steps: int, original_steps: int | None, num_train_timesteps: int):
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps {num_steps} exceeds num_train_timesteps {num_train_timesteps}")
    if len(origin) // num_steps < 1:
        raise ValueError(
            f"the origin schedule has {len(origin)} timesteps (original steps x strength), fewer than "
            f"num_inference_steps {num_steps}"
        )
    if original_steps is not None and num_steps > original_steps:
        raise ValueError(f"num_inference_steps {num_steps} exceeds original_inference_steps {original_steps}")
    origin = origin[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx].copy()


__all__ = [
    "BETA_SCHEDULES",
    "DDPM_ONLY_BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "X0Limit",
    "aligned_origin",
    "alphas_cumprod",
    "beta_table",
    "cumprod_alphas",
    "dynamic_threshold",
    "limit_x0",
    "noise_at",
    "pick",
    "to_x0_eps",
]
