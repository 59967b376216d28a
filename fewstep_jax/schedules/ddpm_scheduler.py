"""diffusers' ``DDPMScheduler`` (0.42) step by step on a DDPM path: ancestral sampling, the loop a
``DDPMPipeline`` user runs.

Facts of the reference (pinned by tests/test_schedulers.py):

* Timesteps are DDIM's (``leading`` / ``trailing`` / ``linspace``, ``steps_offset`` with leading),
  but each step goes to the *next timestep of the schedule* (not ``t - T // N``), and after the
  last to ``abar = 1``.
* The step is the posterior mean ``sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t)
  (1 - abar_prev) / (1 - abar_t) x_t`` with ``alpha_t = abar_t / abar_prev`` (so a skipping step's
  "beta" is ``1 - abar_t / abar_prev``), x0 clipped or thresholded first; noise is added whenever
  the current timestep is above 0, the last step included unless it is at timestep 0 (``trailing``
  ends at 249 for N = 4: its output carries noise).
* ``variance_type``: ``fixed_small`` (the posterior variance, floored at 1e-20) and
  ``fixed_small_log`` (the same, through exp / log) or ``fixed_large`` (``beta_t``). The learned
  variances need a model that predicts them; ``fixed_large_log`` takes the square root of a log
  (NaN) in diffusers' step: both are refused.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import Array, ModelFn, X0Limit, limit_x0, noise_at, to_x0_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def ddpm_step(
    model_output: Array,
    timestep: int,
    prev_timestep: int,
    sample: Array,
    abar: np.ndarray,
    noise: Array | None,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    *,
    x0_limit: X0Limit | None = None,
) -> Array:
    """One ``DDPMScheduler.step`` to ``prev_timestep`` (-1: clean data); ``noise`` is needed when
    ``timestep > 0``."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(
            f"variance_type {variance_type!r} is not supported; expected one of {VARIANCE_TYPES}"
        )
    abar_t = jnp.float32(abar[timestep])
    abar_prev = jnp.float32(abar[prev_timestep] if prev_timestep >= 0 else 1.0)
    alpha_t = abar_t / abar_prev
    beta_t = 1.0 - alpha_t
    x0, _ = to_x0_eps(model_output, sample, abar_t, prediction_type)
    x0 = limit_x0(x0, x0_limit)
    x = (jnp.sqrt(abar_prev) * beta_t / (1.0 - abar_t)) * x0 + (
        jnp.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
    ) * sample
    if timestep > 0:
        if noise is None:
            raise ValueError("a DDPM step above timestep 0 needs the injected noise")
        if variance_type == "fixed_large":
            std = jnp.sqrt(beta_t)
        else:
            var = jnp.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
            std = jnp.exp(0.5 * jnp.log(var)) if variance_type == "fixed_small_log" else jnp.sqrt(var)
        x = x + std * noise
    return x


def ddpm_sample(
    model_fn: ModelFn,
    x: Array,
    timesteps,
    abar: np.ndarray,
    noises=None,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    return_trajectory: bool = False,
    *,
    x0_limit: X0Limit | None = None,
):
    """The ``DDPMScheduler`` loop over ``timesteps`` (e.g. ``ddim_scheduler.ddim_timesteps``);
    ``noises`` (N, ...): one per step, used by the steps above timestep 0."""
    ts = [int(k) for k in np.asarray(timesteps)]
    traj = [x]
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        z = noise_at(noises, i, len(ts), "DDPM sampling") if t > 0 else None
        x = ddpm_step(model_fn(x, t), t, prev, x, abar, z, prediction_type, variance_type, x0_limit=x0_limit)
        traj.append(x)
    return (x, traj) if return_trajectory else x


__all__ = ["VARIANCE_TYPES", "ddpm_sample", "ddpm_step"]
