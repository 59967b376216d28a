"""LCM, latent consistency distillation (docs/methods.md §5.3).

Consistency to data with LCM's boundary scalings on integer timesteps (``timestep_scaling`` 10):
``d(c_skip x_hi + c_out x0_theta(x_hi), sg(c_skip x_lo + c_out x0_target(x_lo)))`` on the sampled
DDIM jump of :mod:`.ddim_jump`.
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
from fewstep_jax.paths import DDPM, Path, bcast
from fewstep_jax.schedules.lcm_scheduler import lcm_boundary_scalings
from fewstep_jax.students import Student

Array = jax.Array

LCM_DEFAULTS = {**DDIM_JUMP_DEFAULTS, "timestep_scaling": 10.0, "num_train_timesteps": 1000}


def lcm_scalings(path: Path, t: Array, timestep_scaling: float = 10.0, num_train_timesteps: int = 1000):
    """LCM ``(c_skip, c_out)`` at continuous ``t`` read as DDPM timestep ``t T - 1`` (>= 0)."""
    T = path.num_train_timesteps if isinstance(path, DDPM) else num_train_timesteps
    k = jnp.maximum(jnp.asarray(t, jnp.float32) * T - 1.0, 0.0)
    return lcm_boundary_scalings(k, timestep_scaling)


@register("lcm")
def lcm_term(cfg: ml_collections.ConfigDict, student: Student):
    """LCM term (see module doc); metrics ``lcm_distance``, ``lcm_t_hi``, ``teacher_nfe``."""
    o = read_jump_options(cfg, LCM_DEFAULTS, "lcm")
    guided = o["w_max"] > 0
    nfe = jump_nfe(guided)
    scal = lambda t: lcm_scalings(student.path, t, o["timestep_scaling"], o["num_train_timesteps"])

    def consistency(p, x, t, kw):
        x0, _ = student.x0_eps(p, x, t, None, **kw)
        c_skip, c_out = scal(t)
        return bcast(c_skip, x) * x + bcast(c_out, x) * x0

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        target = target_params(o, params, inputs)
        x_hi, t_hi, t_lo, _, w, kw = sample_jump(o, student, batch, rng)
        x_lo = teacher_ddim_jump(inputs, student, x_hi, t_hi, t_lo, batch.get("label"), w, guided)
        pred = consistency(params, x_hi, t_hi, kw)
        tgt = jax.lax.stop_gradient(consistency(target, x_lo, t_lo, kw))
        loss = mean_distance(pred, tgt, o["distance"], o["huber_c"])
        return loss, {"lcm_distance": loss, "lcm_t_hi": jnp.mean(t_hi), "teacher_nfe": nfe}

    return term


__all__ = ["LCM_DEFAULTS", "lcm_scalings", "lcm_term"]
