"""TCD and LCM distillation terms (METHODS.md 3.1, 3.2, 5.3).

Both sample a jump ``t_hi -> t_lo`` of the teacher's DDIM solver with skipping step ``k``
(the 50-point grid ``t_i = 20 i - 1`` of a 1000-step DDPM path; ``i / N`` on any other path),
noise real data to ``t_hi``, take one guided teacher DDIM step to ``t_lo`` and ask the student
at ``t_hi`` to agree with the target network at ``t_lo``:

* ``"tcd"``: trajectory consistency ``f(x_hi, t_hi, t_m) ~ f_target(x_lo, t_lo, t_m)`` with
  ``t_m <= t_lo`` sampled as in the unofficial training script (``end ~ U{0..idx}``), and ``f`` the
  trajectory consistency function TCF(1) (the student in semi-linear form, ``alpha_s x0 +
  sigma_s eps``) or TCF(2) (second-order exponential integrator through ``u`` at ``lambda_t + r h``).
* ``"lcm"``: consistency to data with LCM's boundary scalings on integer timesteps
  (``timestep_scaling`` 10): ``c_skip x + c_out x0``.

Guidance is LCM's form ``x_c + w (x_c - x_u)``, ``w ~ U[w_min, w_max]``, i.e. the teacher's
Imagen scale ``1 + w`` (METHODS pitfall 19); with ``guidance_embed`` the student receives ``w``
as its guidance input. The target is the EMA ``inputs.ema["target"]`` (``target="ema"``) or the
online params under stop-gradient (``target="online"``, LCM-LoRA style).

Teacher cost (metric ``teacher_nfe``): one DDIM step, i.e. one teacher evaluation per example,
two when guided (``w_max > 0``: the conditional and the unconditional call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax.losses import distances
from fewstep_jax.losses.api import LossInputs, register
from fewstep_jax.paths import DDPM, Path, bcast
from fewstep_jax.students import Student
from fewstep_jax.tcd import ddim_solver_tables, lcm_boundary_scalings

Array = jax.Array

_COMMON = {
    "weight": 1.0,
    "num_ddim_timesteps": 50,
    "w_min": 0.0,
    "w_max": 0.0,
    "guidance_embed": False,
    "target": "ema",
    "distance": "l2",
    "huber_c": 1e-3,
}
TCD_DEFAULTS = {**_COMMON, "tcf_order": 1, "tcf2_r": 0.5}
LCM_DEFAULTS = {**_COMMON, "timestep_scaling": 10.0, "num_train_timesteps": 1000}


def _read(cfg, defaults: dict, name: str) -> dict:
    given = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else (cfg or {}))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"loss term {name!r}: unknown config keys {unknown}; known: {sorted(defaults)}")
    out = {**defaults, **given}
    if out["target"] not in ("ema", "online"):
        raise ValueError(f"loss term {name!r}: target must be 'ema' or 'online', got {out['target']!r}")
    if out["distance"] not in ("l2", "huber"):
        raise ValueError(f"loss term {name!r}: distance must be 'l2' or 'huber', got {out['distance']!r}")
    if not 0.0 <= out["w_min"] <= out["w_max"]:
        raise ValueError(f"loss term {name!r}: need 0 <= w_min <= w_max, got {out['w_min']}, {out['w_max']}")
    return out


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


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


def distance(a: Array, b: Array, kind: str = "l2", c: float = 1e-3) -> Array:
    """Batch mean of the per-sample ``l2`` or elementwise pseudo-Huber distance (losses.distances)."""
    if kind not in ("l2", "huber"):
        raise ValueError(f"unknown distance {kind!r}; expected 'l2' or 'huber'")
    return jnp.mean(distances.distance(a, b, kind, c))


def tcf(student: Student, params, x: Array, t: Array, s: Array, order: int = 1, r: float = 0.5, **kw):
    """Trajectory consistency function ``f(x_t, t, s)``, order 1 or 2; ``f(x, t, t) = x`` exactly.

    TCF(1): ``alpha_s x0 + sigma_s eps`` of the network's prediction at ``(x, t)`` (the student's
    semi-linear form). TCF(2): with ``h = lambda_s - lambda_t`` (``lambda = log alpha/sigma``),
    ``u`` at ``lambda_t + r h``, ``D = (1 - 1/(2r)) x0(x_t, t) + 1/(2r) x0(x_u, u)``,
    ``f = alpha_s D + sigma_s (x_t - alpha_t D) / sigma_t``.
    """
    if order == 1:
        return student(params, x, t, s, **kw)
    if order != 2:
        raise ValueError(f"tcf order must be 1 or 2, got {order}")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"tcf2_r must lie in (0, 1], got {r}")
    path = student.path
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
    x0_t, _ = student.x0_eps(params, x, t, s, **kw)
    # e^{-h} = (sigma_s alpha_t) / (alpha_s sigma_t) in [0, 1]; floored so s = 0 (h = inf) stays finite
    a_t, sg_t = path.alpha_sigma(t)
    a_s, sg_s = path.alpha_sigma(s)
    q = jnp.clip((sg_s * a_t) / jnp.maximum(a_s * sg_t, 1e-12), 1e-12, 1.0)
    logsnr_u = path.logsnr(t) - 2.0 * r * jnp.log(q)
    u = jnp.clip(path.t_from_logsnr(logsnr_u), s, t)
    a_u, sg_u = path.alpha_sigma(u)
    _, eps_t = path.to_x0_eps(x0_t, "x0", x, t)
    x_u = bcast(a_u, x) * x0_t + bcast(sg_u, x) * eps_t
    x0_u, _ = student.x0_eps(params, x_u, u, s, **kw)
    d = (1.0 - 0.5 / r) * x0_t + (0.5 / r) * x0_u
    _, eps_d = path.to_x0_eps(d, "x0", x, t)
    out = bcast(a_s, x) * d + bcast(sg_s, x) * eps_d
    return jnp.where(bcast(s == t, x), x, out)


def _teacher_jump(inputs: LossInputs, student: Student, x_hi, t_hi, t_lo, label, w, guided: bool):
    """One guided teacher DDIM step ``t_hi -> t_lo`` (no gradient)."""
    teacher = inputs.teacher
    if teacher is None:
        raise ValueError("TCD / LCM distillation needs a teacher (inputs.teacher is None)")
    if teacher.path != student.path:
        raise ValueError(f"teacher path {teacher.path} differs from the student's {student.path}")
    guidance = 1.0 + w if guided else 1.0
    x0, eps = teacher.x0_eps(x_hi, t_hi, label, guidance)
    return jax.lax.stop_gradient(student.path.interpolate(x0, eps, t_lo))


def _jump_nfe(guided: bool) -> float:
    """Teacher evaluations per example of :func:`_teacher_jump`: guided, its guidance ``1 + w`` is
    a per-sample array (two calls); unguided, the scalar 1.0 (one call)."""
    return 2.0 if guided else 1.0


def _sample_common(o: dict, student: Student, batch: dict, rng: Array):
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


def _target_params(o: dict, params, inputs: LossInputs):
    if o["target"] == "online":
        return jax.lax.stop_gradient(params)
    if "target" not in inputs.ema:
        raise ValueError("target='ema' needs EMA params inputs.ema['target'] (set the target EMA decay)")
    return jax.lax.stop_gradient(inputs.ema["target"])


# ---------------------------------------------------------------------------------------------
# registered terms
# ---------------------------------------------------------------------------------------------


@register("tcd")
def tcd_term(cfg: ml_collections.ConfigDict, student: Student):
    """TCD loss ``d(f_theta(x_hi, t_hi, t_m), sg f_target(DDIM_teacher(x_hi), t_lo, t_m))``."""
    o = _read(cfg, TCD_DEFAULTS, "tcd")
    if student.form != "semilinear":
        raise ValueError(
            f"the 'tcd' term needs a semi-linear student (TCF), got form={student.form!r}; "
            "build Student(form='semilinear')"
        )
    order, r = int(o["tcf_order"]), float(o["tcf2_r"])
    guided = o["w_max"] > 0
    nfe = _jump_nfe(guided)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        target = _target_params(o, params, inputs)
        x_hi, t_hi, t_lo, t_m, w, kw = _sample_common(o, student, batch, rng)
        x_lo = _teacher_jump(inputs, student, x_hi, t_hi, t_lo, batch.get("label"), w, guided)
        pred = tcf(student, params, x_hi, t_hi, t_m, order, r, **kw)
        tgt = jax.lax.stop_gradient(tcf(student, target, x_lo, t_lo, t_m, order, r, **kw))
        loss = distance(pred, tgt, o["distance"], o["huber_c"])
        return loss, {
            "tcd_distance": loss,
            "tcd_t_hi": jnp.mean(t_hi),
            "tcd_t_m": jnp.mean(t_m),
            "teacher_nfe": nfe,
        }

    return term


def lcm_scalings(path: Path, t: Array, timestep_scaling: float = 10.0, num_train_timesteps: int = 1000):
    """LCM ``(c_skip, c_out)`` at continuous ``t`` read as DDPM timestep ``t T - 1`` (>= 0)."""
    T = path.num_train_timesteps if isinstance(path, DDPM) else num_train_timesteps
    k = jnp.maximum(jnp.asarray(t, jnp.float32) * T - 1.0, 0.0)
    return lcm_boundary_scalings(k, timestep_scaling)


@register("lcm")
def lcm_term(cfg: ml_collections.ConfigDict, student: Student):
    """LCM loss ``d(c_skip x_hi + c_out x0_theta(x_hi), sg(c_skip x_lo + c_out x0_target(x_lo)))``."""
    o = _read(cfg, LCM_DEFAULTS, "lcm")
    guided = o["w_max"] > 0
    nfe = _jump_nfe(guided)
    scal = lambda t: lcm_scalings(student.path, t, o["timestep_scaling"], o["num_train_timesteps"])

    def consistency(p, x, t, kw):
        x0, _ = student.x0_eps(p, x, t, None, **kw)
        c_skip, c_out = scal(t)
        return bcast(c_skip, x) * x + bcast(c_out, x) * x0

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        target = _target_params(o, params, inputs)
        x_hi, t_hi, t_lo, _, w, kw = _sample_common(o, student, batch, rng)
        x_lo = _teacher_jump(inputs, student, x_hi, t_hi, t_lo, batch.get("label"), w, guided)
        pred = consistency(params, x_hi, t_hi, kw)
        tgt = jax.lax.stop_gradient(consistency(target, x_lo, t_lo, kw))
        loss = distance(pred, tgt, o["distance"], o["huber_c"])
        return loss, {"lcm_distance": loss, "lcm_t_hi": jnp.mean(t_hi), "teacher_nfe": nfe}

    return term


__all__ = ["LCM_DEFAULTS", "TCD_DEFAULTS", "distance", "lcm_scalings", "skip_times", "tcf"]
