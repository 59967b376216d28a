"""Pieces shared by the trajectory terms: option blocks, data, target params, the student's jump.

Data: ``x0 = batch["x"]``; the noise is ``batch["noise"] / path.prior_scale`` when the batch has
one (teacher pairs of :mod:`fewstep_jax.teachers.pairs`), else fresh standard normal noise. A
``label`` in the batch conditions both networks. ``g`` is the student's velocity reading
(``student.velocity``), the average velocity over [s, t] of an Euler-form student:
``G(x, t, s) = x + (s - t) g(x, t, s)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fewstep_jax.losses import distances
from fewstep_jax.losses.api import LossInputs
from fewstep_jax.losses.trajectory.grid import JUMP_SAMPLERS, JUMP_SOLVERS, JUMP_WEIGHTINGS
from fewstep_jax.paths import Path, bcast
from fewstep_jax.students import Student
from fewstep_jax.teachers.base import Teacher

Array = jax.Array
sg = jax.lax.stop_gradient

TRAJECTORY_DISTANCES = distances.allowed("l2", "huber", "huber_vec")
TARGETS = ("ema", "online")
# allowed values of the options the trajectory terms share (checked by read_options)
CHOICES = {
    "distance": TRAJECTORY_DISTANCES,
    "solver": JUMP_SOLVERS,
    "jump_weighting": JUMP_WEIGHTINGS,
    "jump_sampler": JUMP_SAMPLERS,
    "target": TARGETS,
    "bootstrap_target": TARGETS,
    "euler_into_data": ("auto", True, False),
}

# time-grid options shared by the grid-based terms (CTM defaults for CIFAR-10: N = 18, K = 17);
# jump_sampler: TraFlow's start-first (measured, docs/methods.md §2.3); the ctm term defaults to CTM's
GRID = {
    "grid": "uniform",
    "num_grid": 18,
    "max_jump": 17,
    "jump_weighting": "linear",
    "jump_sampler": "start_first",
}
# euler_into_data: "auto" = the teacher's rule (Teacher.euler_into_data), as the evaluation's solvers
SOLVE = {"solver": "heun", "substeps": 1, "guidance": 1.0, "euler_into_data": "auto"}


def solve_options(opts: dict) -> dict:
    """A term's SOLVE options as the keyword arguments of ``grid.teacher_jump``."""
    return {
        "method": opts["solver"],
        "substeps": opts["substeps"],
        "guidance": opts["guidance"],
        "euler_into_data": opts["euler_into_data"],
    }


DIST = {"distance": "l2", "huber_c": 0.0}


def mse(a: Array, b: Array) -> Array:
    """Per-sample squared error, mean over dims (B,)."""
    return distances.distance(a, b, "l2")


def mean(v: Array) -> Array:
    return jnp.mean(v).astype(jnp.float32)


def need_teacher(inputs: LossInputs, name: str) -> Teacher:
    if inputs.teacher is None:
        raise ValueError(f"loss term {name!r} needs a teacher (inputs.teacher is None)")
    return inputs.teacher


def target_params(inputs: LossInputs, params, which: str, name: str):
    """The frozen params of a target network: the EMA ``target`` or the online params."""
    if which == "online":
        return sg(params)
    if "target" not in inputs.ema:
        raise ValueError(
            f"loss term {name!r} needs the EMA target params inputs.ema['target'] "
            f"(have {sorted(inputs.ema)}); set a target EMA in the config or target='online'"
        )
    return sg(inputs.ema["target"])


def data(batch: Mapping[str, Array], rng: Array, path: Path, name: str, pairs: bool = False):
    """``(x0, eps, label)``: eps from the batch's teacher noise when present, else fresh noise."""
    if "x" not in batch:
        raise ValueError(f"loss term {name!r} needs batch key 'x'; got keys {sorted(batch)}")
    x0 = jnp.asarray(batch["x"], jnp.float32)
    if "noise" in batch:
        eps = jnp.asarray(batch["noise"], jnp.float32) / path.prior_scale
        if eps.shape != x0.shape:
            raise ValueError(f"batch 'noise' {eps.shape} and 'x' {x0.shape} must have the same shape")
    elif pairs:
        raise ValueError(
            f"loss term {name!r} trains on teacher (noise, sample) pairs: the batch needs keys 'noise' "
            f"and 'x' (see fewstep_jax.teachers.pairs); got keys {sorted(batch)}"
        )
    else:
        eps = jax.random.normal(rng, x0.shape, jnp.float32)
    return x0, eps, batch.get("label")


def flow(student: Student, params, x: Array, t: Array, s: Array, **kw) -> tuple[Array, Array]:
    """``(G(x, t, s), g(x, t, s))`` with one network call for Euler-form students."""
    g = student.velocity(params, x, t, s, **kw)
    if student.form == "euler":
        return x + bcast(jnp.broadcast_to(s - t, (x.shape[0],)), x) * g, g
    return student(params, x, t, s, **kw), g


__all__ = [
    "CHOICES",
    "DIST",
    "GRID",
    "SOLVE",
    "TARGETS",
    "TRAJECTORY_DISTANCES",
    "data",
    "flow",
    "mean",
    "mse",
    "need_teacher",
    "target_params",
]
