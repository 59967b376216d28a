"""Shortcut models (docs/methods.md §5.6).

Rows ``[0, B // bootstrap_every)`` regress ``g(x_t, t, t - d)`` on the bootstrap target of
:func:`shortcut_target` (``d = 2^-i``, ``i ~ U{0..log2 M - 1}``, ``t`` a multiple of ``d``), the
other rows do flow matching at ``d = 1/M`` (``t ~ U{1..M}/M``, target ``alpha' x + sigma' eps``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fewstep_jax.losses.api import LossInputs, register
from fewstep_jax.losses.options import read_options
from fewstep_jax.losses.trajectory.common import CHOICES, data, mean, mse, sg, target_params
from fewstep_jax.paths import bcast
from fewstep_jax.students import Student

Array = jax.Array

SHORTCUT_DEFAULTS = {"denoise_timesteps": 128, "bootstrap_every": 8, "bootstrap_target": "ema", "clip": 4.0}


def shortcut_target(
    student: Student,
    params,
    x: Array,
    t: Array,
    d: Array,
    label: Array | None = None,
    clip: float | None = 4.0,
) -> Array:
    """Bootstrap target of a jump of size ``d`` (B,) from ``t``: the mean of two ``d/2`` velocities
    of ``params`` (the EMA), states and target clipped to ``[-clip, clip]`` (None: no clip)."""
    cl = (lambda v: jnp.clip(v, -clip, clip)) if clip else (lambda v: v)
    half = 0.5 * d
    v1 = student.velocity(params, x, t, t - half, label=label)
    x_mid = cl(x - bcast(half, x) * v1)
    v2 = student.velocity(params, x_mid, t - half, t - d, label=label)
    return sg(cl(0.5 * (v1 + v2)))


@register("shortcut")
def shortcut(cfg, student: Student):
    """Shortcut term (see module doc); metrics ``shortcut/loss``, ``/fm``, ``/bootstrap``."""
    opts = read_options(cfg, SHORTCUT_DEFAULTS, "shortcut", CHOICES)
    M = int(opts["denoise_timesteps"])
    if M < 2 or M & (M - 1):
        raise ValueError(f"shortcut: denoise_timesteps must be a power of 2 >= 2, got {M}")
    if int(opts["bootstrap_every"]) < 1:
        raise ValueError(f"shortcut: bootstrap_every must be >= 1, got {opts['bootstrap_every']}")
    if not student.uses_s:
        raise ValueError("shortcut: the student must take s (uses_s=True): it is conditioned on d = t - s")
    levels = int(math.log2(M))
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_lvl, k_j, k_fm, k_drop = jax.random.split(rng, 5)
        x0, eps, label = data(batch, k_noise, path, "shortcut")
        B = x0.shape[0]
        nb = B // int(opts["bootstrap_every"])
        lvl = jax.random.randint(k_lvl, (B,), 0, levels)
        d_b = jnp.exp2(-lvl.astype(jnp.float32))
        j_b = jnp.floor(jax.random.uniform(k_j, (B,)) * jnp.exp2(lvl.astype(jnp.float32))) + 1.0
        t_fm = jax.random.randint(k_fm, (B,), 1, M + 1).astype(jnp.float32) / M
        is_b = jnp.arange(B) < nb
        d = jnp.where(is_b, d_b, 1.0 / M)
        t = jnp.where(is_b, jnp.minimum(j_b * d_b, 1.0), t_fm)
        x_t = path.interpolate(x0, eps, t)
        v_fm = path.from_x0_eps("flow", x0, eps, t)
        if nb:
            tp = target_params(inputs, params, opts["bootstrap_target"], "shortcut")
            sl = lambda c: jax.tree.map(lambda a: a[:nb], c)  # class labels or a conditioning pytree
            v_b = shortcut_target(student, tp, x_t[:nb], t[:nb], d[:nb], sl(label), opts["clip"])
            target = jnp.concatenate([v_b, v_fm[nb:]], axis=0)
        else:
            target = v_fm
        g = student.velocity(params, x_t, t, t - d, label=label, rng=k_drop, train=True)
        err = mse(g, sg(target))
        loss = mean(err)
        metrics = {"shortcut/loss": loss, "shortcut/fm": mean(err[nb:])}
        if nb:
            metrics["shortcut/bootstrap"] = mean(err[:nb])
        return loss, metrics

    return term


__all__ = ["SHORTCUT_DEFAULTS", "shortcut", "shortcut_target"]
