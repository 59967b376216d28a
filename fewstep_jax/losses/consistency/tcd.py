"""TCD, trajectory consistency distillation (docs/methods.md §3.1, §3.2).

``d(f_theta(x_hi, t_hi, t_m), sg f_target(DDIM_teacher(x_hi), t_lo, t_m))`` on the sampled DDIM
jump of :mod:`.ddim_jump`, with ``t_m <= t_lo`` drawn as in the unofficial training script
(``end ~ U{0..idx}``) and ``f`` the trajectory consistency function :func:`tcf`: TCF(1) (the
student in semi-linear form, ``alpha_s x0 + sigma_s eps``) or TCF(2) (second-order exponential
integrator through ``u`` at ``lambda_t + r h``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fewstep_jax.losses.api import LossInputs, register
from fewstep_jax.losses.consistency.ddim_jump import (
    DDIM_JUMP_DEFAULTS,
    jump_nfe,
    read_jump_options,
    sample_jump,
    target_params,
    teacher_ddim_jump,
)
from fewstep_jax.losses.distances import mean_distance
from fewstep_jax.paths import bcast
from fewstep_jax.students import Student

Array = jax.Array

TCD_DEFAULTS = {**DDIM_JUMP_DEFAULTS, "tcf_order": 1, "tcf2_r": 0.5}


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
    # s at the data (sigma_s = 0, h = inf): lambda_u = +inf, so u = s exactly; the floor alone would
    # leave u at lambda_t + 27.6 r, far from the data for small r (r = 0.1 at t = 0.5 on rf: u = 0.06)
    u = jnp.where((sg_s == 0.0) & (a_t > 0.0), s, u)
    if r == 1.0:  # lambda_u = lambda_t + h = lambda_s: u = s, also from pure noise (lambda_t = -inf)
        u = s
    a_u, sg_u = path.alpha_sigma(u)
    _, eps_t = path.to_x0_eps(x0_t, "x0", x, t)
    x_u = bcast(a_u, x) * x0_t + bcast(sg_u, x) * eps_t
    x0_u, _ = student.x0_eps(params, x_u, u, s, **kw)
    d = (1.0 - 0.5 / r) * x0_t + (0.5 / r) * x0_u
    _, eps_d = path.to_x0_eps(d, "x0", x, t)
    out = bcast(a_s, x) * d + bcast(sg_s, x) * eps_d
    return jnp.where(bcast(s == t, x), x, out)


@register("tcd")
def tcd_term(cfg: ml_collections.ConfigDict, student: Student):
    """TCD term (see module doc); metrics ``tcd_distance``, ``tcd_t_hi``, ``tcd_t_m``, ``teacher_nfe``."""
    o = read_jump_options(cfg, TCD_DEFAULTS, "tcd")
    if student.form != "semilinear":
        raise ValueError(
            f"the 'tcd' term needs a semi-linear student (TCF), got form={student.form!r}; "
            "build Student(form='semilinear')"
        )
    order, r = int(o["tcf_order"]), float(o["tcf2_r"])
    guided = o["w_max"] > 0
    nfe = jump_nfe(guided)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        target = target_params(o, params, inputs)
        x_hi, t_hi, t_lo, t_m, w, kw = sample_jump(o, student, batch, rng)
        x_lo = teacher_ddim_jump(inputs, student, x_hi, t_hi, t_lo, batch.get("label"), w, guided)
        pred = tcf(student, params, x_hi, t_hi, t_m, order, r, **kw)
        tgt = jax.lax.stop_gradient(tcf(student, target, x_lo, t_lo, t_m, order, r, **kw))
        loss = mean_distance(pred, tgt, o["distance"], o["huber_c"])
        return loss, {
            "tcd_distance": loss,
            "tcd_t_hi": jnp.mean(t_hi),
            "tcd_t_m": jnp.mean(t_m),
            "teacher_nfe": nfe,
        }

    return term


__all__ = ["TCD_DEFAULTS", "tcd_term", "tcf"]
