"""Students beside their teacher on one shared reference: the harness of the pipeline
(:mod:`fewstep_jax.modes.pipeline`), the distillation benchmark (:mod:`fewstep_jax.bench.distill`)
and a distill run's own report (:mod:`.distill_eval`).

On an exact testbed one evaluation noise and its exact flow map (:func:`shared_reference`) serve
every row: each distilled student's samplers at its NFEs (:func:`student_rows`), the teacher's
fixed-step solvers at the same NFEs (:func:`teacher_solver_rows`) and the converged teacher / data
floor (:func:`~fewstep_jax.evaluation.scoring.reference_rows`), all in the row format of
:mod:`.scoring`. Configuring the runs, training them and writing the tables are the callers'.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from fewstep_jax.config_utils import as_tuple
from fewstep_jax.evaluation.scoring import Reference, evaluate_samplers, make_reference
from fewstep_jax.evaluation.student_eval import steps_kw_fn, student_condition, student_samplers
from fewstep_jax.evaluation.teacher_solvers import solver_samplers
from fewstep_jax.solvers import default_grid
from fewstep_jax.students import Student
from fewstep_jax.testbeds.exact import ExactTestbed


def shared_reference(
    c: ml_collections.ConfigDict,
    testbed: ExactTestbed,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
    per_class: bool = True,
    rtol: float = 1e-5,
) -> Reference:
    """The evaluation noise of run config ``c`` (``eval.num_samples`` draws from ``seed``) and its
    exact flow map under ``testbed.teacher`` (adaptive RK45 at ``rtol``, in ``eval.batch_size``
    batches); conditional with ``label`` (N,) at CFG scale ``guidance``, scored per class unless
    not ``per_class`` (see :func:`~fewstep_jax.evaluation.scoring.make_reference`)."""
    ec = c.eval
    ref = make_reference(
        testbed,
        int(ec.num_samples),
        int(c.seed),
        int(ec.batch_size),
        label=label,
        guidance=guidance,
        rtol=rtol,
    )
    return dataclasses.replace(ref, per_class=per_class)


def student_rows(
    c: ml_collections.ConfigDict,
    student: Student,
    params,
    testbed: ExactTestbed,
    ref: Reference,
    log=print,
    keep: dict | None = None,
) -> list[dict]:
    """Rows of the student (eval-EMA ``params``) of run config ``c`` on ``ref``: its samplers
    (``c.sampler``: grid, gammas, kind; named ``c.method``, ``"<method> (gamma g)"``) at
    ``c.sampler.nfes``, conditioned like ``ref`` (labels, CFG scale); samples of every NFE go to
    ``keep[name][nfe]`` when given."""
    ec, sc = c.eval, c.sampler
    nfes = as_tuple(sc.nfes, int)
    ss = student_samplers(
        student,
        params,
        c.method or "student",
        sc.grid,
        as_tuple(sc.gammas, float),
        sc.kind,
        int(ec.batch_size),
        int(c.seed),
        steps_kw_fn(c),
        # a conditional reference (labels, CFG scale) conditions the student the same way
        student_condition(c, ref),
    )
    return evaluate_samplers(testbed, ss, nfes, ref, log, keep=keep, keep_nfes=nfes)


def teacher_solver_rows(
    c: ml_collections.ConfigDict,
    testbed: ExactTestbed,
    ref: Reference,
    methods,
    nfes,
    log=print,
    keep: dict | None = None,
) -> list[dict]:
    """Rows ``teacher <method>`` of the teacher's fixed-step ``methods`` at ``nfes`` on the
    reference's noise and condition (labels, CFG scale), on ``c.eval.grid`` (``auto``: the path's
    default), in ``c.eval.batch_size`` batches; samples go to ``keep`` when given."""
    ec = c.eval
    grid_kind = default_grid(testbed.teacher.path.name) if ec.grid == "auto" else ec.grid
    samp = solver_samplers(
        testbed.teacher,
        methods,
        grid_kind,
        int(ec.batch_size),
        testbed.singular_at_data,
        ref.label,
        ref.guidance,
    )
    named = {f"teacher {k}": v for k, v in samp.items()}
    return evaluate_samplers(testbed, named, nfes, ref, log, keep=keep, keep_nfes=nfes)


__all__ = ["shared_reference", "student_rows", "teacher_solver_rows"]
