"""TraFlow: one time sample, one teacher solve, every part of the loss (docs/methods.md §2.3).

On a grid time sample ``s <= r < t`` (:mod:`.grid`) with the teacher's jump ``x_r = Phi(x_t, t -> r)``:

* ``rec``: ``d(G(x_t, t, r), x_r)``;
* ``vel``: variant A ``|g(x_t, t, s) - v_teacher(x_t, t)|^2``, variant B
  ``|g(x_t, t, r) - (x_t - x_r) / (t - r)|^2``;
* ``con``: ``d(G_tgt(G(x_t, t, s), s, 0), sg G_tgt(sg G(x_r, r, s), s, 0))`` (CTM's soft consistency);
* ``straight``: ``|g(x_t, t, s) - g(x_t, t, r)|^2`` (both ends live);
* ``dsm``: ``|x0_hat(x_t, t, t) - x0|^2``.

Registered terms: ``traflow`` (``lam_* `` weights of every part) and the single-part terms
``traflow_rec``, ``traflow_vel``, ``traflow_con``, ``straightness``; CTM is this core with its
own weights fixed (:mod:`.ctm`). Every target is under ``stop_gradient``.

Teacher cost (metric ``teacher_nfe``, see ``losses/api.py``): the jump pays ``max_jump * substeps``
solver steps per example whatever its ``k`` (the padded steps are real evaluations), x2 for Heun,
plus one velocity for ``vel_variant`` A, all x2 with guidance != 1; the parts share the one solve.
``unpadded_nfe`` is what a solve of each sample's own ``k * substeps`` steps would cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fewstep_jax import solvers
from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.distances import distance
from fewstep_jax.losses.options import read_options
from fewstep_jax.losses.trajectory.common import (
    CHOICES,
    DIST,
    GRID,
    SOLVE,
    data,
    flow,
    mean,
    mse,
    need_teacher,
    sg,
    solve_options,
    target_params,
)
from fewstep_jax.losses.trajectory.grid import sample_grid_times, teacher_jump, time_grid
from fewstep_jax.paths import bcast
from fewstep_jax.students import Student

Array = jax.Array

TRAFLOW_DEFAULTS = {
    **GRID,
    **SOLVE,
    **DIST,
    "lam_rec": 1.0,
    "lam_vel": 1.0,
    "lam_con": 1.0,
    "lam_straight": 0.0,
    "lam_dsm": 0.0,
    "vel_variant": "A",
    "target": "ema",
}


def _traflow_core(opts: dict, student: Student, name: str):
    if opts["vel_variant"] not in ("A", "B"):
        raise ValueError(f"{name}: vel_variant must be 'A' or 'B', got {opts['vel_variant']!r}")
    lam = {p: float(opts[f"lam_{p}"]) for p in ("rec", "vel", "con", "straight", "dsm")}
    if not any(lam.values()):
        raise ValueError(f"{name}: every lam_* weight is zero")
    if lam["straight"] and not student.uses_s:
        # an s-agnostic g makes it identically zero (s-agnostic con / vel are allowed: TCD-like ablation)
        raise ValueError(f"{name}: the straightness term needs an s-conditioned student (uses_s)")
    path = student.path
    grid = jnp.asarray(time_grid(opts["grid"], opts["num_grid"], path))
    K = min(int(opts["max_jump"]), int(opts["num_grid"]))
    variant_b = opts["vel_variant"] == "B"
    need_r = lam["rec"] or lam["straight"] or (lam["vel"] and variant_b)
    need_s = lam["con"] or lam["straight"] or (lam["vel"] and not variant_b)
    need_xr = lam["rec"] or lam["con"] or (lam["vel"] and variant_b)
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])
    per_call = teacher_evals_per_call(opts["guidance"])
    nfe_step = solvers.NFE_PER_STEP[opts["solver"]]
    # teacher evaluations per example besides the jump: variant A's velocity target
    nfe_vel = per_call if lam["vel"] and not variant_b else 0
    nfe_jump = per_call * nfe_step * K * int(opts["substeps"]) if need_xr else 0

    def term(params, inputs: LossInputs, batch, rng):
        teacher = need_teacher(inputs, name)
        tp = target_params(inputs, params, opts["target"], name) if lam["con"] else None
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = data(batch, k_noise, path, name)
        B = x0.shape[0]
        ts = sample_grid_times(k_time, grid, B, K, opts["jump_weighting"], opts["jump_sampler"])
        x_t = path.interpolate(x0, eps, ts.t)
        kw = {"label": label, "rng": k_drop, "train": True}
        x_r = None
        if need_xr:
            x_r = teacher_jump(teacher, x_t, grid, ts.n, ts.k, K, label=label, **solve_options(opts))
        if need_r:
            G_tr, g_tr = flow(student, params, x_t, ts.t, ts.r, **kw)
        if need_s:
            G_ts, g_ts = flow(student, params, x_t, ts.t, ts.s, **kw)

        parts = {}
        if lam["rec"]:
            parts["rec"] = mean(d(G_tr, x_r))
        if lam["vel"]:
            if variant_b:
                u_avg = sg((x_t - x_r) / bcast(ts.t - ts.r, x_t))
                parts["vel"] = mean(mse(g_tr, u_avg))
            else:
                u = sg(teacher.velocity(x_t, ts.t, label, opts["guidance"]))
                parts["vel"] = mean(mse(g_ts, u))
        if lam["con"]:
            zero = jnp.zeros_like(ts.s)
            tkw = {"label": label}
            est = student(tp, G_ts, ts.s, zero, **tkw)  # gradient through the input only
            inner = sg(student(sg(params), x_r, ts.r, ts.s, **tkw))
            tgt = sg(student(tp, inner, ts.s, zero, **tkw))
            parts["con"] = mean(d(est, tgt))
        if lam["straight"]:
            # both ends live: zero iff the student's jumps from x_t to r and to s share one velocity
            parts["straight"] = mean(mse(g_ts, g_tr))
        if lam["dsm"]:
            x0_hat, _ = student.x0_eps(params, x_t, ts.t, ts.t, **kw)
            parts["dsm"] = mean(mse(x0_hat, x0))
        total = sum(lam[p] * v for p, v in parts.items())
        metrics = {f"{name}/{p}": v for p, v in parts.items()}
        metrics[f"{name}/jump"] = mean(ts.k)
        if nfe_jump or nfe_vel:
            metrics["teacher_nfe"] = float(nfe_jump + nfe_vel)
            if need_xr:
                metrics["unpadded_nfe"] = per_call * nfe_step * int(opts["substeps"]) * mean(ts.k) + nfe_vel
        return total, metrics

    return term


def traflow_factory(name: str, fixed: Mapping[str, Any], defaults: Mapping[str, Any] | None = None):
    """A factory of the TraFlow core with the options ``fixed`` set (not configurable) and
    ``defaults`` overriding TraFlow's (configurable)."""
    defaults = {k: v for k, v in {**TRAFLOW_DEFAULTS, **(defaults or {})}.items() if k not in fixed}

    def factory(cfg, student: Student):
        return _traflow_core({**read_options(cfg, defaults, name, CHOICES), **fixed}, student, name)

    return factory


_NONE = {"lam_rec": 0.0, "lam_vel": 0.0, "lam_con": 0.0, "lam_straight": 0.0, "lam_dsm": 0.0}
traflow = register("traflow")(traflow_factory("traflow", {}))
traflow_rec = register("traflow_rec")(
    traflow_factory("traflow_rec", {**_NONE, "lam_rec": 1.0, "vel_variant": "A", "target": "ema"})
)
traflow_vel = register("traflow_vel")(
    traflow_factory("traflow_vel", {**_NONE, "lam_vel": 1.0, "target": "ema"})
)
traflow_con = register("traflow_con")(
    traflow_factory("traflow_con", {**_NONE, "lam_con": 1.0, "vel_variant": "A"})
)
straightness = register("straightness")(
    traflow_factory("straightness", {**_NONE, "lam_straight": 1.0, "vel_variant": "A", "target": "ema"})
)


__all__ = [
    "TRAFLOW_DEFAULTS",
    "straightness",
    "traflow",
    "traflow_con",
    "traflow_factory",
    "traflow_rec",
    "traflow_vel",
]
