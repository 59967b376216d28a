"""diffusers' ``DDIMScheduler`` (0.42) step by step on a DDPM path.

``leading`` spacing steps to ``t - T // N`` and uses ``final_alpha_cumprod`` (1 with
``set_alpha_to_one``) below 0. Pinned by tests/test_tcd.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import Array, ModelFn, noise_at, to_x0_eps


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0) -> np.ndarray:
    """``DDIMScheduler.set_timesteps`` with ``timestep_spacing='leading'`` (descending int64)."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps)[::-1] * ratio + steps_offset).astype(np.int64)


def ddim_step(
    model_output: Array,
    timestep: int,
    prev_timestep: int,
    sample: Array,
    abar: np.ndarray,
    eta: float = 0.0,
    noise: Array | None = None,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float = 1.0,
) -> Array:
    """One ``DDIMScheduler.step`` (no clipping/thresholding); ``noise`` is needed when eta > 0."""
    abar_t = jnp.float32(abar[timestep])
    abar_prev = jnp.float32(abar[prev_timestep] if prev_timestep >= 0 else final_alpha_cumprod)
    x0, eps = to_x0_eps(model_output, sample, abar_t, prediction_type)
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = eta * jnp.sqrt(variance)
    x = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - std**2) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs the injected noise")
        x = x + std * noise
    return x


def ddim_sample(
    model_fn: ModelFn,
    x: Array,
    timesteps,
    abar: np.ndarray,
    eta: float = 0.0,
    noises=None,
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    final_alpha_cumprod: float = 1.0,
    return_trajectory: bool = False,
):
    """``DDIMScheduler`` loop (leading spacing: previous timestep ``t - T // N``)."""
    ts = [int(k) for k in np.asarray(timesteps)]
    ratio = num_train_timesteps // len(ts)
    traj = [x]
    for i, t in enumerate(ts):
        z = noise_at(noises, i, len(ts), "DDIM sampling with eta > 0") if eta > 0 else None
        x = ddim_step(model_fn(x, t), t, t - ratio, x, abar, eta, z, prediction_type, final_alpha_cumprod)
        traj.append(x)
    return (x, traj) if return_trajectory else x


__all__ = ["ddim_sample", "ddim_step", "ddim_timesteps"]
