"""diffusers-exact TCD / LCM / DDIM scheduling on the integer timesteps of a DDPM path.

These functions reproduce ``TCDScheduler``, ``LCMScheduler`` and ``DDIMScheduler`` of diffusers
(0.42) step by step (METHODS.md 3.3, 5.3), so a checkpoint trained elsewhere samples the same here
and a student trained here can be compared with the reference. Timesteps are integers
``0..T-1`` of the discrete DDPM schedule ``alphas_cumprod`` (``paths.DDPM.alphas_cumprod``); a
model is a function ``model_fn(x (B, ...), timestep int) -> (B, ...)`` predicting ``eps``,
``sample`` (x0) or ``v_prediction``, the names diffusers uses. All injected noise is explicit.

Facts of the reference worth knowing (pinned by tests/test_tcd.py):

* ``TCDScheduler.step`` treats the step after the last one as timestep 0 (not -1): the last jump
  lands on ``abar[0]`` (``1 - beta_0``), so ``final_alpha_cumprod`` is never read by TCD.
* ``LCMScheduler.step`` re-noises the boundary-scaled denoised sample to the next timestep; its
  last output is the denoised sample itself (``final_alpha_cumprod`` is never read either).
* ``DDIMScheduler`` (``leading`` spacing) steps to ``t - T // N`` and uses ``final_alpha_cumprod``
  (1 with ``set_alpha_to_one``) below 0.
* ``TCDScheduler.set_timesteps(original_inference_steps=...)`` passed explicitly switches to the
  "customised" origin schedule ``0..T*strength-1``; left at None it uses the config's value and
  the aligned schedule ``k i - 1``. :func:`tcd_timesteps` keeps that distinction.
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


# ---------------------------------------------------------------------------------------------
# timestep schedules (set_timesteps)
# ---------------------------------------------------------------------------------------------


def _aligned_origin(original_steps: int, num_train_timesteps: int, strength: float) -> np.ndarray:
    if original_steps > num_train_timesteps:
        raise ValueError(
            f"original_inference_steps {original_steps} exceeds num_train_timesteps {num_train_timesteps}"
        )
    k = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1


def _pick(origin: np.ndarray, num_steps: int, original_steps: int | None, num_train_timesteps: int):
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
        origin = _aligned_origin(default_original_inference_steps, num_train_timesteps, strength)
        return _pick(origin, num_steps, default_original_inference_steps, num_train_timesteps)
    origin = np.arange(0, int(num_train_timesteps * strength), dtype=np.int64)
    return _pick(origin, num_steps, original_inference_steps, num_train_timesteps)


def lcm_timesteps(
    num_steps: int,
    original_inference_steps: int = 50,
    *,
    num_train_timesteps: int = 1000,
    strength: float = 1.0,
) -> np.ndarray:
    """``LCMScheduler.set_timesteps`` (descending int64): the aligned grid ``k i - 1``, evenly picked."""
    origin = _aligned_origin(original_inference_steps, num_train_timesteps, strength)
    return _pick(origin, num_steps, original_inference_steps, num_train_timesteps)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0) -> np.ndarray:
    """``DDIMScheduler.set_timesteps`` with ``timestep_spacing='leading'`` (descending int64)."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps)[::-1] * ratio + steps_offset).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# single steps (pure jnp)
# ---------------------------------------------------------------------------------------------


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
) -> tuple[Array, Array]:
    """One ``LCMScheduler.step``: ``(prev_sample, denoised)``; ``noise`` None on the last step."""
    abar_t, abar_prev = jnp.float32(abar[timestep]), jnp.float32(abar[prev_timestep])
    x0, _ = to_x0_eps(model_output, sample, abar_t, prediction_type)
    c_skip, c_out = lcm_boundary_scalings(timestep, timestep_scaling)
    denoised = c_out * x0 + c_skip * sample
    if noise is None:
        return denoised, denoised
    return jnp.sqrt(abar_prev) * denoised + jnp.sqrt(1.0 - abar_prev) * noise, denoised


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


# ---------------------------------------------------------------------------------------------
# samplers (Python loops over concrete integer timesteps; the model may be jitted)
# ---------------------------------------------------------------------------------------------


def _noise_at(noises, i: int, n_needed: int, name: str):
    if noises is None:
        raise ValueError(f"{name} with re-noising needs the injected noise: {n_needed} arrays shaped like x")
    if len(noises) < n_needed:
        raise ValueError(f"{name} needs {n_needed} injected noise arrays, got {len(noises)}")
    return noises[i]


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
        z = None if (last or gamma == 0) else _noise_at(noises, i, len(ts) - 1, "TCD sampling")
        x, _ = tcd_step(model_fn(x, t), t, prev, x, abar, gamma, z, prediction_type)
        traj.append(x)
    return (x, traj) if return_trajectory else x


def lcm_sample(
    model_fn: ModelFn,
    x: Array,
    timesteps,
    abar: np.ndarray,
    noises=None,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    return_trajectory: bool = False,
):
    """LCM multistep sampling (``LCMScheduler`` loop); ``noises`` (N - 1, ...) are the injected z."""
    ts = [int(k) for k in np.asarray(timesteps)]
    traj = [x]
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        prev = t if last else ts[i + 1]
        z = None if last else _noise_at(noises, i, len(ts) - 1, "LCM sampling")
        x, _ = lcm_step(model_fn(x, t), t, prev, x, abar, z, prediction_type, timestep_scaling)
        traj.append(x)
    return (x, traj) if return_trajectory else x


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
        z = _noise_at(noises, i, len(ts), "DDIM sampling with eta > 0") if eta > 0 else None
        x = ddim_step(model_fn(x, t), t, t - ratio, x, abar, eta, z, prediction_type, final_alpha_cumprod)
        traj.append(x)
    return (x, traj) if return_trajectory else x


# ---------------------------------------------------------------------------------------------
# the DDIM teacher solver of LCM / TCD distillation (skipping step k)
# ---------------------------------------------------------------------------------------------


def ddim_solver_tables(abar: np.ndarray, num_ddim_timesteps: int = 50) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ddim_timesteps, alpha_cumprod_prev, k)`` of the distillation solver.

    ``ddim_timesteps = k i - 1`` for i = 1..N (19..999 for N = 50), and ``alpha_cumprod_prev[i]``
    is ``abar`` at the next-lower grid point, ``abar[0]`` for the first (METHODS pitfall 4).
    """
    T = len(abar)
    if not 1 <= num_ddim_timesteps <= T:
        raise ValueError(f"num_ddim_timesteps must be in [1, {T}], got {num_ddim_timesteps}")
    k = T // num_ddim_timesteps
    ts = (np.arange(1, num_ddim_timesteps + 1) * k).round().astype(np.int64) - 1
    prev = np.concatenate([[abar[0]], abar[ts[:-1]]]).astype(np.float32)
    return ts, prev, k


def ddim_solver_step(x0: Array, eps: Array, abar_prev: Array) -> Array:
    """``sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``; ``abar_prev`` (B,) broadcast over x."""
    a = jnp.asarray(abar_prev, x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


__all__ = [
    "PREDICTION_TYPES",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_solver_step",
    "ddim_solver_tables",
    "ddim_step",
    "ddim_timesteps",
    "lcm_boundary_scalings",
    "lcm_sample",
    "lcm_step",
    "lcm_timesteps",
    "tcd_intermediate_timestep",
    "tcd_sample",
    "tcd_step",
    "tcd_timesteps",
    "to_x0_eps",
]
