"""diffusers' ``TCDScheduler`` (0.42) step by step on a DDPM path: timesteps, the strategic
stochastic step (gamma) and the sampling loop (docs/methods.md §3.3).

Facts of the reference (pinned by tests/test_tcd.py):

* ``TCDScheduler.step`` treats the step after the last one as timestep 0 (not -1): the last jump
  lands on ``abar[0]`` (``1 - beta_0``), so ``final_alpha_cumprod`` is never read by TCD.
* ``TCDScheduler.set_timesteps(original_inference_steps=...)`` passed explicitly switches to the
  "customised" origin schedule ``0..T*strength-1``; left at None it uses the config's value and
  the aligned schedule ``k i - 1``. :func:`tcd_timesteps` keeps that distinction.
* ``TCDScheduler.step`` never clips or thresholds the predicted x0: its config's ``clip_sample``,
  ``thresholding`` (and their ranges), ``set_alpha_to_one``, ``timestep_spacing``,
  ``steps_offset`` and ``timestep_scaling`` change nothing (tests/test_schedulers.py runs diffusers
  with them set).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import Array, ModelFn, aligned_origin, noise_at, pick, to_x0_eps


def tcd_timesteps(
    num_steps: int,
    original_inference_steps: int | None = None,
    *,
    default_original_inference_steps: int = 50,
    num_train_timesteps: int = 1000,
    strength: float = 1.0,
) -> np.ndarray:
    """``TCDScheduler.set_timesteps`` (descending int64), e.g. 4 -> ``[999, 759, 499, 259]``.

    ``original_inference_steps=None`` is diffusers' default option (the aligned 50-point grid of the
    scheduler config); an explicit value selects its "customised" origin ``0..T*strength-1``.
    """
    if original_inference_steps is None:
        origin = aligned_origin(default_original_inference_steps, num_train_timesteps, strength)
        return pick(origin, num_steps, default_original_inference_steps, num_train_timesteps)
    origin = np.arange(0, int(num_train_timesteps * strength), dtype=np.int64)
    return pick(origin, num_steps, original_inference_steps, num_train_timesteps)


def tcd_intermediate_timestep(prev_timestep: int, gamma: float) -> int:
    """TCD's ``s' = floor((1 - gamma) * tau_next)`` (an integer timestep), computed in float32 as torch."""
    return int(np.floor(np.float32(1.0 - gamma) * np.float32(prev_timestep)))


def tcd_step(
    model_output: Array,
    timestep: int,
    prev_timestep: int,
    sample: Array,
    abar: np.ndarray,
    gamma: float,
    noise: Array | None,
    prediction_type: str = "epsilon",
) -> tuple[Array, Array]:
    """One ``TCDScheduler.step``: returns ``(prev_sample, pred_noised_sample)``.

    ``noise`` is the injected z (None on the last step, or when gamma = 0: no re-noising).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma (eta) must lie in [0, 1], got {gamma}")
    ts = tcd_intermediate_timestep(prev_timestep, gamma)
    abar_t, abar_prev, abar_s = (jnp.float32(abar[k]) for k in (timestep, prev_timestep, ts))
    x0, eps = to_x0_eps(model_output, sample, abar_t, prediction_type)
    x_s = jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps
    if gamma > 0 and noise is not None:
        r = abar_prev / abar_s
        return jnp.sqrt(r) * x_s + jnp.sqrt(1.0 - r) * noise, x_s
    return x_s, x_s


def tcd_sample(
    model_fn: ModelFn,
    x: Array,
    timesteps,
    abar: np.ndarray,
    gamma: float = 0.3,
    noises=None,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
):
    """TCD's strategic stochastic sampling (``TCDScheduler`` loop) from ``x`` at ``timesteps[0]``.

    Args:
      model_fn: ``(x, timestep) -> model output``.
      x: the initial state (diffusers: ``randn`` with ``init_noise_sigma = 1``).
      timesteps: descending ints (e.g. :func:`tcd_timesteps`).
      abar: ``alphas_cumprod`` (T,).
      gamma: TCD's gamma (diffusers' ``eta``) in [0, 1].
      noises: (N - 1, ...) injected noise, one per non-final step (unused when gamma = 0).
    Returns:
      the final sample (and the list of states after each step).
    """
    ts = [int(k) for k in np.asarray(timesteps)]
    traj = [x]
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        prev = 0 if last else ts[i + 1]
        z = None if (last or gamma == 0) else noise_at(noises, i, len(ts) - 1, "TCD sampling")
        x, _ = tcd_step(model_fn(x, t), t, prev, x, abar, gamma, z, prediction_type)
        traj.append(x)
    return (x, traj) if return_trajectory else x


__all__ = ["tcd_intermediate_timestep", "tcd_sample", "tcd_step", "tcd_timesteps"]
