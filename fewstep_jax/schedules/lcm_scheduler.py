"""diffusers' ``LCMScheduler`` (0.42) step by step on a DDPM path (docs/methods.md §5.3).

``LCMScheduler.step`` limits the predicted x0 (``clip_sample`` / ``thresholding``, like DDIM),
re-noises the boundary-scaled denoised sample to the next timestep; its last output is the denoised
sample itself (``final_alpha_cumprod`` is never read, so ``set_alpha_to_one`` changes nothing, nor
do ``timestep_spacing`` and ``steps_offset``, which ``set_timesteps`` ignores). Pinned by
tests/test_tcd.py and tests/test_schedulers.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import (
    Array,
    ModelFn,
    X0Limit,
    aligned_origin,
    limit_x0,
    noise_at,
    pick,
    to_x0_eps,
)


def lcm_timesteps(
    num_steps: int,
    original_inference_steps: int = 50,
    *,
    num_train_timesteps: int = 1000,
    strength: float = 1.0,
) -> np.ndarray:
    """``LCMScheduler.set_timesteps`` (descending int64): the aligned grid ``k i - 1``, evenly picked."""
    origin = aligned_origin(original_inference_steps, num_train_timesteps, strength)
    return pick(origin, num_steps, original_inference_steps, num_train_timesteps)


def lcm_boundary_scalings(timestep, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's ``(c_skip, c_out)`` of an integer timestep (scaled by ``timestep_scaling``)."""
    st = jnp.asarray(timestep, jnp.float32) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / jnp.sqrt(st**2 + sigma_data**2)
    return c_skip, c_out


def lcm_step(
    model_output: Array,
    timestep: int,
    prev_timestep: int,
    sample: Array,
    abar: np.ndarray,
    noise: Array | None,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    *,
    x0_limit: X0Limit | None = None,
) -> tuple[Array, Array]:
    """One ``LCMScheduler.step``: ``(prev_sample, denoised)``; ``noise`` None on the last step."""
    abar_t, abar_prev = jnp.float32(abar[timestep]), jnp.float32(abar[prev_timestep])
    x0, _ = to_x0_eps(model_output, sample, abar_t, prediction_type)
    x0 = limit_x0(x0, x0_limit)
    c_skip, c_out = lcm_boundary_scalings(timestep, timestep_scaling)
    denoised = c_out * x0 + c_skip * sample
    if noise is None:
        return denoised, denoised
    return jnp.sqrt(abar_prev) * denoised + jnp.sqrt(1.0 - abar_prev) * noise, denoised


def lcm_sample(
    model_fn: ModelFn,
    x: Array,
    timesteps,
    abar: np.ndarray,
    noises=None,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    return_trajectory: bool = False,
    *,
    x0_limit: X0Limit | None = None,
):
    """LCM multistep sampling (``LCMScheduler`` loop); ``noises`` (N - 1, ...) are the injected z."""
    ts = [int(k) for k in np.asarray(timesteps)]
    traj = [x]
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        prev = t if last else ts[i + 1]
        z = None if last else noise_at(noises, i, len(ts) - 1, "LCM sampling")
        x, _ = lcm_step(
            model_fn(x, t), t, prev, x, abar, z, prediction_type, timestep_scaling, x0_limit=x0_limit
        )
        traj.append(x)
    return (x, traj) if return_trajectory else x


__all__ = ["lcm_boundary_scalings", "lcm_sample", "lcm_step", "lcm_timesteps"]
