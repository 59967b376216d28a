"""Reflow and its one-step distillation, both on teacher (noise, sample) pairs (docs/methods.md §5.1).

The pairs come from :mod:`fewstep_jax.teachers.pairs` (``batch = {"noise", "x"}``, see
:func:`.common.data`):

* ``reflow``: flow matching on the pairs, ``|g(x_t, t, t) - (alpha' x + sigma' noise)|^2`` (RF:
  ``noise - x``), ``x_t`` on the line between the pair, ``t ~ U[0, 1 - t_eps]``;
* ``reflow_distill``: ``d(G(x_t, t, 0), x)`` with ``t = j / num_steps``, ``j ~ U{1..num_steps}``
  (``num_steps = 1``: ``G(noise, 1, 0)`` vs the paired sample).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewstep_jax.losses.api import LossInputs, register
from fewstep_jax.losses.distances import distance
from fewstep_jax.losses.options import read_options
from fewstep_jax.losses.trajectory.common import CHOICES, DIST, data, mean, mse, sg
from fewstep_jax.students import Student

REFLOW_DEFAULTS = {"t_eps": 1e-3}
REFLOW_DISTILL_DEFAULTS = {**DIST, "num_steps": 1}


@register("reflow")
def reflow(cfg, student: Student):
    """Reflow term (see module doc); metric ``reflow/loss``."""
    opts = read_options(cfg, REFLOW_DEFAULTS, "reflow", CHOICES)
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = data(batch, k_noise, path, "reflow", pairs=True)
        t = jax.random.uniform(k_time, (x0.shape[0],), maxval=1.0 - opts["t_eps"])
        x_t = path.interpolate(x0, eps, t)
        target = sg(path.from_x0_eps("flow", x0, eps, t))
        g = student.velocity(params, x_t, t, t, label=label, rng=k_drop, train=True)
        loss = mean(mse(g, target))
        return loss, {"reflow/loss": loss}

    return term


@register("reflow_distill")
def reflow_distill(cfg, student: Student):
    """Distillation of a (re)flow on its pairs (see module doc); metric ``reflow_distill/loss``."""
    opts = read_options(cfg, REFLOW_DISTILL_DEFAULTS, "reflow_distill", CHOICES)
    path = student.path
    k_steps = int(opts["num_steps"])
    if k_steps < 1:
        raise ValueError(f"reflow_distill: num_steps must be >= 1, got {k_steps}")
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = data(batch, k_noise, path, "reflow_distill", pairs=True)
        j = jax.random.randint(k_time, (x0.shape[0],), 1, k_steps + 1)
        t = j.astype(jnp.float32) / k_steps
        x_t = path.interpolate(x0, eps, t)
        pred = student(params, x_t, t, jnp.zeros_like(t), label=label, rng=k_drop, train=True)
        loss = mean(d(pred, x0))
        return loss, {"reflow_distill/loss": loss}

    return term


__all__ = ["REFLOW_DEFAULTS", "REFLOW_DISTILL_DEFAULTS", "reflow", "reflow_distill"]
