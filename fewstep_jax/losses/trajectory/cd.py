"""Consistency distillation, CD (docs/methods.md §5.2).

``d(G_theta(x_{t_n}, t_n, 0), sg G_tgt(Phi(x_{t_n}, t_n -> t_{n-1}), t_{n-1}, 0))``, ``n ~ U{1..N}``
on the grid of :mod:`.grid`, one teacher step (Heun by default); the target is the online params
under stop-gradient (CM-JAX) or the EMA target (``target='ema'``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewstep_jax import solvers
from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.distances import distance
from fewstep_jax.losses.options import read_options
from fewstep_jax.losses.trajectory.common import (
    CHOICES,
    DIST,
    SOLVE,
    data,
    mean,
    need_teacher,
    sg,
    solve_options,
    target_params,
)
from fewstep_jax.losses.trajectory.grid import sample_grid_times, teacher_jump, time_grid
from fewstep_jax.students import Student

CD_DEFAULTS = {**SOLVE, **DIST, "grid": "edm", "num_grid": 18, "target": "online"}


@register("cd")
def cd(cfg, student: Student):
    """CD term (see module doc); metrics ``cd/loss``, ``teacher_nfe``."""
    opts = read_options(cfg, CD_DEFAULTS, "cd", CHOICES)
    nfe = teacher_evals_per_call(opts["guidance"]) * solvers.nfe_of(opts["solver"], int(opts["substeps"]))
    path = student.path
    grid = jnp.asarray(time_grid(opts["grid"], opts["num_grid"], path))
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])

    def term(params, inputs: LossInputs, batch, rng):
        teacher = need_teacher(inputs, "cd")
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = data(batch, k_noise, path, "cd")
        ts = sample_grid_times(k_time, grid, x0.shape[0], 1, "linear", "start_first")  # n ~ U{1..N}, k = 1
        x_t = path.interpolate(x0, eps, ts.t)
        x_r = teacher_jump(teacher, x_t, grid, ts.n, ts.k, 1, label=label, **solve_options(opts))
        zero = jnp.zeros_like(ts.t)
        est = student(params, x_t, ts.t, zero, label=label, rng=k_drop, train=True)
        tp = target_params(inputs, params, opts["target"], "cd")
        tgt = sg(student(tp, x_r, ts.r, zero, label=label, rng=k_drop, train=True))
        loss = mean(d(est, tgt))
        return loss, {"cd/loss": loss, "teacher_nfe": float(nfe)}

    return term


__all__ = ["CD_DEFAULTS", "cd"]
