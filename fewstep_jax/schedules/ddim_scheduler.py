"""diffusers' ``DDIMScheduler`` (0.42) step by step on a DDPM path.

Facts of the reference (pinned by tests/test_schedulers.py and tests/test_tcd.py):

* ``step`` goes from ``t`` to ``t - T // N`` whatever the ``timestep_spacing``: with ``leading``
  that is the next timestep of the schedule, with ``trailing`` it can be one off (N = 3: 666 -> 333
  while the next model call is at 332) and with ``linspace`` it is not (N = 4: 999 -> 749, next
  call at 666). The mirror keeps this.
* Below timestep 0 the step lands on ``final_alpha_cumprod``: 1 with ``set_alpha_to_one``, else
  ``alphas_cumprod[0]``.
* The predicted x0 is thresholded or clipped (:class:`~fewstep_jax.schedules.ddpm.X0Limit`) before
  the step; ``use_clipped_model_output`` re-derives eps from the limited x0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import Array, ModelFn, X0Limit, limit_x0, noise_at, to_x0_eps

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    timestep_spacing: str = "leading",
) -> np.ndarray:
    """``DDIMScheduler.set_timesteps`` (descending int64); ``steps_offset`` is added by ``leading`` only.

    N = 4, T = 1000: leading ``[750, 500, 250, 0]``, trailing ``[999, 749, 499, 249]``, linspace
    ``[999, 666, 333, 0]``.
    """
    T = num_train_timesteps
    if num_steps < 1 or num_steps > T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_steps}")
    if timestep_spacing == "leading":
        return (np.arange(num_steps)[::-1] * (T // num_steps) + steps_offset).astype(np.int64)
    if timestep_spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / num_steps)) - 1).astype(np.int64)
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")


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
    *,
    x0_limit: X0Limit | None = None,
    use_clipped_model_output: bool = False,
) -> Array:
    """One ``DDIMScheduler.step``; ``noise`` is needed when eta > 0. ``x0_limit`` None: no clipping."""
    abar_t = jnp.float32(abar[timestep])
    abar_prev = jnp.float32(abar[prev_timestep] if prev_timestep >= 0 else final_alpha_cumprod)
    x0, eps = to_x0_eps(model_output, sample, abar_t, prediction_type)
    x0 = limit_x0(x0, x0_limit)
    if use_clipped_model_output:
        eps = (sample - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
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
    *,
    x0_limit: X0Limit | None = None,
    use_clipped_model_output: bool = False,
):
    """The ``DDIMScheduler`` loop over ``timesteps`` (each step to ``t - T // N``, see the module
    docstring); ``noises`` (N, ...) are the injected noise of eta > 0."""
    ts = [int(k) for k in np.asarray(timesteps)]
    ratio = num_train_timesteps // len(ts)
    traj = [x]
    for i, t in enumerate(ts):
        z = noise_at(noises, i, len(ts), "DDIM sampling with eta > 0") if eta > 0 else None
        x = ddim_step(
            model_fn(x, t),
            t,
            t - ratio,
            x,
            abar,
            eta,
            z,
            prediction_type,
            final_alpha_cumprod,
            x0_limit=x0_limit,
            use_clipped_model_output=use_clipped_model_output,
        )
        traj.append(x)
    return (x, traj) if return_trajectory else x


__all__ = ["TIMESTEP_SPACINGS", "ddim_sample", "ddim_step", "ddim_timesteps"]
