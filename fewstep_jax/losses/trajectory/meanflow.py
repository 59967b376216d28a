"""MeanFlow (docs/methods.md §5.7).

``|g(x_t, t, s) - meanflow_target|^2`` with ``v`` the teacher velocity (``velocity='teacher'``) or
the conditional one ``alpha' x + sigma' eps`` (``'conditional'``); a fraction ``equal_fraction`` of
rows has ``s = t``; optional adaptive weight ``sg(1 / (err_sum + c)^p)`` with ``err_sum`` the
per-sample squared error **summed** over dimensions, as MeanFlow and NVlabs/FastGen
(``adaptive_p``, ``adaptive_c``). The loss is ``mean_b[ err_mean * sg(1 / (err_sum + c)^p) ]``
(``err_mean = err_sum / D``, the project's L2 convention, docs/methods.md §1.3): MeanFlow's
``err_sum / sg((err_sum + c)^p)`` divided by the constant D, and the plain mean-over-dims MSE at
``p = 0``. (Until issue 16 the weight used ``err_mean``: with ``c`` fixed, a different weighting.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.options import read_options
from fewstep_jax.losses.trajectory.common import CHOICES, data, mean, mse, need_teacher, sg
from fewstep_jax.paths import bcast
from fewstep_jax.students import Student

Array = jax.Array

MEANFLOW_DEFAULTS = {
    "velocity": "teacher",
    "equal_fraction": 0.75,
    "time_sampler": "uniform",
    "logit_mean": -0.4,
    "logit_std": 1.0,
    "adaptive_p": 0.0,
    "adaptive_c": 1e-3,
    "guidance": 1.0,
}
MEANFLOW_CHOICES = {
    **CHOICES,
    "velocity": ("teacher", "conditional"),
    "time_sampler": ("uniform", "logit_normal"),
}


def meanflow_target(student: Student, params, x: Array, t: Array, s: Array, v: Array, label=None) -> Array:
    """``sg[v - (t - s)(v . d_x g + d_t g)]`` at ``(x, t, s)`` via one JVP (s held fixed)."""
    fn = lambda xx, tt: student.velocity(sg(params), xx, tt, s, label=label)
    _, dg = jax.jvp(fn, (x, t), (v, jnp.ones_like(t)))
    return sg(v - bcast(t - s, x) * dg)


@register("meanflow")
def meanflow(cfg, student: Student):
    """MeanFlow term (see module doc); metrics ``meanflow/loss`` (+ ``teacher_nfe``)."""
    opts = read_options(cfg, MEANFLOW_DEFAULTS, "meanflow", MEANFLOW_CHOICES)
    if not student.uses_s:
        raise ValueError("meanflow: the student must take s (uses_s=True)")
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_eq, k_drop = jax.random.split(rng, 4)
        x0, eps, label = data(batch, k_noise, path, "meanflow")
        B = x0.shape[0]
        if opts["time_sampler"] == "uniform":
            u = jax.random.uniform(k_time, (2, B))
        else:
            u = jax.nn.sigmoid(opts["logit_mean"] + opts["logit_std"] * jax.random.normal(k_time, (2, B)))
        t, s = jnp.max(u, axis=0), jnp.min(u, axis=0)
        s = jnp.where(jax.random.uniform(k_eq, (B,)) < opts["equal_fraction"], t, s)
        x_t = path.interpolate(x0, eps, t)
        if opts["velocity"] == "teacher":
            v = sg(need_teacher(inputs, "meanflow").velocity(x_t, t, label, opts["guidance"]))
        else:
            v = path.from_x0_eps("flow", x0, eps, t)
        target = meanflow_target(student, params, x_t, t, s, v, label)
        g = student.velocity(params, x_t, t, s, label=label, rng=k_drop, train=True)
        err = mse(g, target)  # (B,) mean over dims
        if opts["adaptive_p"]:
            # MeanFlow's weight reads the per-sample error summed over dimensions
            err_sum = err * math.prod(g.shape[1:])
            err = err * sg(1.0 / (err_sum + opts["adaptive_c"]) ** opts["adaptive_p"])
        loss = mean(err)
        metrics = {"meanflow/loss": loss}
        if opts["velocity"] == "teacher":
            metrics["teacher_nfe"] = float(teacher_evals_per_call(opts["guidance"]))
        return loss, metrics

    return term


__all__ = ["MEANFLOW_DEFAULTS", "meanflow", "meanflow_target"]
