"""The DDIM teacher solver of LCM / TCD distillation (``DDIMSolver`` of diffusers' LCM
distillation scripts): a skipping step ``k`` on the grid ``k i - 1``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fewstep_jax.schedules.ddpm import Array


def ddim_solver_tables(abar: np.ndarray, num_ddim_timesteps: int = 50) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ddim_timesteps, alpha_cumprod_prev, k)`` of the distillation solver.

    ``ddim_timesteps = k i - 1`` for i = 1..N (19..999 for N = 50), and ``alpha_cumprod_prev[i]``
    is ``abar`` at the next-lower grid point, ``abar[0]`` for the first (docs/methods.md pitfall 4).
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


__all__ = ["ddim_solver_step", "ddim_solver_tables"]
