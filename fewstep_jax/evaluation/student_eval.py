"""Students as samplers for :mod:`fewstep_jax.evaluation.scoring` (the same rows as the teacher's).

``student_samplers`` turns a trained student into ``{name: sampler(x1, nfe)}``: a chain of ``nfe``
flow-map jumps on the chosen grid, deterministic (gamma = 0) or with re-noising between jumps,
fed the same evaluation noise as the teacher's solvers. A class-conditional student scored
against a conditional reference gets the reference's labels (and CFG scale) through
``condition`` (:func:`student_condition`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import samplers, solvers
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.students import Student


@partial(jax.jit, static_argnames=("student", "kind"))
def run_chain(student, params, noise, grid, gamma, injected, kind, student_kw):
    """:func:`fewstep_jax.samplers.sample` compiled once per (student, kind): noise (B, ...) at
    the student's unit scale, injected (N - 1, B, ...), ``student_kw`` the student's extra inputs
    (label / guidance (B,), num_steps); returns (B, ...)."""
    return samplers.sample(
        student, params, noise, grid, gamma=gamma, kind=kind, injected=injected, **student_kw
    )


def steps_kw_fn(config):
    """Step-count conditioning of a steps-aware student: the index of ``nfe`` in its trained set
    (None when it was not trained for ``nfe``); None for a student without one."""
    if int(config.model.get("num_step_classes", 0)) <= 0:
        return None
    ks = ()
    for term in config.losses.values():
        if "num_steps" in term:
            ks = as_tuple(term["num_steps"], int)
    return lambda nfe: {"num_steps": jnp.int32(ks.index(nfe))} if nfe in ks else None


def student_samplers(
    student: Student,
    params,
    name: str,
    grid_kind: str = "uniform",
    gammas=(0.0,),
    kind: str = "tcd",
    batch_size: int = 1000,
    seed: int = 0,
    student_kw_fn=None,
    condition: dict | None = None,
) -> dict:
    """Samplers ``x1 (N, ...) at the teacher's prior scale, nfe -> x0`` for each gamma.

    ``student_kw_fn(nfe)`` gives extra student inputs per NFE (e.g. the step-count condition of a
    steps-aware TDM student), or None when the student cannot run at that NFE; the injected noise
    of gamma > 0 is drawn from ``seed`` and is the same for every method. ``condition`` holds
    per-sample student inputs ``{"label": (N,), "guidance": (N,)}`` aligned with ``x1`` (sliced
    with it into batches).
    """
    condition = {k: np.asarray(v) for k, v in (condition or {}).items()}

    def make(gamma):
        def sampler(x1, nfe):
            grid = jnp.asarray(solvers.make_grid(grid_kind, nfe, student.path))
            noise = np.asarray(x1) / student.path.prior_scale
            kw = student_kw_fn(nfe) if student_kw_fn else {}
            if kw is None:  # e.g. a steps-aware student asked for a step count it was not trained on
                return None
            rng = jax.random.PRNGKey(seed + 7919)
            out = []
            for i in range(0, len(noise), batch_size):
                nb = jnp.asarray(noise[i : i + batch_size])
                kw_b = {**kw, **{k: jnp.asarray(v[i : i + batch_size]) for k, v in condition.items()}}
                inj = jax.random.normal(jax.random.fold_in(rng, i), (max(nfe - 1, 1), *nb.shape))
                y = run_chain(
                    student, params, nb, grid, jnp.float32(gamma), inj[: max(nfe - 1, 0)], kind, kw_b
                )
                out.append(np.asarray(y))
            return np.concatenate(out)

        return sampler

    return {(name if g == 0 else f"{name} (gamma {g:g})"): make(g) for g in gammas}


def student_condition(config, ref) -> dict:
    """The student inputs that match a conditional reference (``scoring.Reference`` with labels):
    ``{}`` for an unconditional reference; else the labels (the student must be class-conditional:
    ``config.model.num_classes`` = the teacher's) and, for a student with a guidance input
    (``config.model.use_guidance``), LCM's ``w' = guidance - 1`` per sample: the form TCD / LCM
    train it in (``losses/tcd.py``: teacher scale ``1 + w'``)."""
    if ref.label is None:
        return {}
    nc = int(config.model.get("num_classes", 0))
    if nc <= 0:
        raise ValueError(
            "a conditional reference (labels / guidance) needs a class-conditional student: "
            f"config.model.num_classes is {nc} (use a *_cfg recipe or set model.num_classes)"
        )
    if int(np.max(ref.label)) >= nc:
        top = int(np.max(ref.label))
        raise ValueError(f"reference labels go up to {top} but the student has {nc} classes")
    cond = {"label": np.asarray(ref.label, np.int32)}
    if bool(config.model.get("use_guidance", False)):
        cond["guidance"] = np.full(len(ref.label), float(ref.guidance) - 1.0, np.float32)
    return cond


__all__ = ["run_chain", "steps_kw_fn", "student_condition", "student_samplers"]
