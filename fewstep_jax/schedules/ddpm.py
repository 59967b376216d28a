"""The integer-timestep DDPM conventions the diffusers schedulers share (``schedules/*_scheduler.py``).

Timesteps are integers ``0..T-1`` of the discrete DDPM schedule ``alphas_cumprod``
(``paths.DDPM.alphas_cumprod``); a model is a function ``model_fn(x (B, ...), timestep int) -> (B, ...)``
predicting ``eps``, ``sample`` (x0) or ``v_prediction``, the names diffusers uses. All injected
noise is explicit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import DDPM

Array = jax.Array
ModelFn = Callable[[Array, int], Array]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def alphas_cumprod(path: DDPM | None = None) -> np.ndarray:
    """``alphas_cumprod`` (T,) float32 of a DDPM path (default: Stable Diffusion's scaled_linear)."""
    path = DDPM() if path is None else path
    if not isinstance(path, DDPM):
        raise ValueError(f"integer-timestep scheduling needs a DDPM path, got {path.name!r}")
    return path.alphas_cumprod().astype(np.float32)


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


__all__ = ["PREDICTION_TYPES", "aligned_origin", "alphas_cumprod", "noise_at", "pick", "to_x0_eps"]
