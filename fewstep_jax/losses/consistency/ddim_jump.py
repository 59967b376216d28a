"""The sampled teacher DDIM jump shared by TCD and LCM (docs/methods.md §3.2, §5.3).

Both sample a jump ``t_hi -> t_lo`` of the teacher's DDIM solver with skipping step ``k`` (the
50-point grid ``t_i = 20 i - 1`` of a 1000-step DDPM path; ``i / N`` on any other path), noise
real data to ``t_hi``, take one guided teacher DDIM step to ``t_lo`` and ask the student at
``t_hi`` to agree with the target network at ``t_lo``.

Guidance is LCM's form ``x_c + w (x_c - x_u)``, ``w ~ U[w_min, w_max]``, i.e. the teacher's Imagen
scale ``1 + w`` (docs/methods.md pitfall 19); with ``guidance_embed`` the student receives ``w``
as its guidance input. The target is the EMA ``inputs.ema["target"]`` (``target="ema"``) or the
online params under stop-gradient (``target="online"``, LCM-LoRA style).

Teacher cost (metric ``teacher_nfe``): one DDIM step, i.e. one teacher evaluation per example,
two when guided (``w_max > 0``: the conditional and the unconditional call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.losses import distances
from fewstep_jax.losses.api import LossInputs
from fewstep_jax.losses.options import read_options
from fewstep_jax.paths import DDPM, Path
from fewstep_jax.schedules.ddim_solver import ddim_solver_tables
from fewstep_jax.students import Student

Array = jax.Array

DDIM_JUMP_DISTANCES = distances.allowed("l2", "huber")
# options of every DDIM-jump term
DDIM_JUMP_DEFAULTS = {
    "num_ddim_timesteps": 50,
    "w_min": 0.0,
    "w_max": 0.0,
    "guidance_embed": False,
    "target": "ema",
    "distance": "l2",
    "huber_c": 1e-3,
}
CHOICES = {"target": ("ema", "online"), "distance": DDIM_JUMP_DISTANCES}


def read_jump_options(cfg, defaults: dict, name: str) -> dict:
    """:func:`read_options` of a DDIM-jump term, with its guidance range checked."""
    out = read_options(cfg, defaults, name, CHOICES)
    if not 0.0 <= out["w_min"] <= out["w_max"]:
        raise ValueError(f"loss term {name!r}: need 0 <= w_min <= w_max, got {out['w_min']}, {out['w_max']}")
    return out


def skip_times(path: Path, num_ddim_timesteps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``(t_start, t_prev)`` (N,) float32: the solver grid and one skipping step below each point.

    On a :class:`DDPM` path these are the integer timesteps ``k i - 1`` and ``max(k i - 1 - k, 0)``
    of the distillation scripts (``t = (timestep + 1) / T``); elsewhere ``i / N`` and ``(i-1) / N``.
    """
    if isinstance(path, DDPM):
        abar = path.alphas_cumprod()
        ts, _, k = ddim_solver_tables(abar, num_ddim_timesteps)
        to_t = lambda ks: (ks.astype(np.float64) + 1.0) / path.num_train_timesteps
        return to_t(ts).astype(np.float32), to_t(np.maximum(ts - k, 0)).astype(np.float32)
    i = np.arange(1, num_ddim_timesteps + 1, dtype=np.float64)
    return (i / num_ddim_timesteps).astype(np.float32), ((i - 1) / num_ddim_timesteps).astype(np.float32)


def teacher_ddim_jump(inputs: LossInputs, student: Student, x_hi, t_hi, t_lo, label, w, guided: bool):
    """One guided teacher DDIM step ``t_hi -> t_lo`` (no gradient)."""
    teacher = inputs.teacher
    if teacher is None:
        raise ValueError("TCD / LCM distillation needs a teacher (inputs.teacher is None)")
    if teacher.path != student.path:
        raise ValueError(f"teacher path {teacher.path} differs from the student's {student.path}")
    guidance = 1.0 + w if guided else 1.0
    x0, eps = teacher.x0_eps(x_hi, t_hi, label, guidance)
    return jax.lax.stop_gradient(student.path.interpolate(x0, eps, t_lo))


def jump_nfe(guided: bool) -> float:
    """Teacher evaluations per example of :func:`teacher_ddim_jump`: guided, its guidance ``1 + w``
    is a per-sample array (two calls); unguided, the scalar 1.0 (one call)."""
    return 2.0 if guided else 1.0


def sample_jump(o: dict, student: Student, batch: dict, rng: Array):
    """``(x_hi, t_hi, t_lo, t_m, w, student kwargs)``: ``idx ~ U{0..N-1}``, ``end ~ U{0..idx}``
    (``t_m = t_prev[end] <= t_lo``), ``w ~ U[w_min, w_max]``, ``x_hi`` real data noised to ``t_hi``."""
    if "x" not in batch:
        raise ValueError("TCD / LCM distillation needs real data batch['x']")
    x = batch["x"]
    b = x.shape[0]
    n = int(o["num_ddim_timesteps"])
    t_start, t_prev = (jnp.asarray(v) for v in skip_times(student.path, n))
    k_idx, k_end, k_w, k_eps = jax.random.split(rng, 4)
    idx = jax.random.randint(k_idx, (b,), 0, n)
    end = jax.random.randint(k_end, (b,), 0, idx + 1)
    w = jax.random.uniform(k_w, (b,), jnp.float32, o["w_min"], o["w_max"])
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    t_hi, t_lo, t_m = t_start[idx], t_prev[idx], t_prev[end]
    x_hi = student.path.interpolate(x, eps, t_hi)
    kw = {"label": batch.get("label")}
    if o["guidance_embed"]:
        kw["guidance"] = w
    return x_hi, t_hi, t_lo, t_m, w, kw


def target_params(o: dict, params, inputs: LossInputs):
    """The frozen target: online params under stop-gradient or the EMA ``target``."""
    if o["target"] == "online":
        return jax.lax.stop_gradient(params)
    if "target" not in inputs.ema:
        raise ValueError("target='ema' needs EMA params inputs.ema['target'] (set the target EMA decay)")
    return jax.lax.stop_gradient(inputs.ema["target"])


__all__ = [
    "CHOICES",
    "DDIM_JUMP_DEFAULTS",
    "DDIM_JUMP_DISTANCES",
    "jump_nfe",
    "read_jump_options",
    "sample_jump",
    "skip_times",
    "target_params",
    "teacher_ddim_jump",
]
