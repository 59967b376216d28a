"""Evaluation and report of a distilled student, beside its teacher at the same NFE.

Rows (same format as the teacher-solver table): the student at ``config.sampler.nfes`` (for each
gamma), the teacher's Euler / Heun / DPM-Solver++(2M) at the same NFEs, the converged teacher and
the data floor; plus the distillation cost. ``report.md`` in the workdir shows the table, sample
grids per NFE, the student's trajectories (2-D) and the loss curves.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import samplers, solvers
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.evaluation import report
from fewstep_jax.evaluation.scoring import Reference, evaluate_samplers, make_reference, reference_rows
from fewstep_jax.evaluation.student_eval import student_samplers
from fewstep_jax.evaluation.teacher_solvers import solver_samplers
from fewstep_jax.solvers import default_grid


def steps_kw_fn(config):
    """Step-count conditioning of a steps-aware student: the index of ``nfe`` in its trained set."""
    if int(config.model.get("num_step_classes", 0)) <= 0:
        return None
    ks = ()
    for term in config.losses.values():
        if "num_steps" in term:
            ks = as_tuple(term["num_steps"], int)
    return lambda nfe: {"num_steps": jnp.int32(ks.index(nfe))} if nfe in ks else None


def evaluate_distilled(
    config,
    student,
    params,
    testbed,
    ref: Reference | None = None,
    teacher_solvers=("euler", "heun", "dpmpp_2m"),
    log=print,
    keep: dict | None = None,
) -> list[dict]:
    """Rows of the student (eval-EMA ``params``) and of the teacher's solvers at the same NFEs."""
    ec, sc = config.eval, config.sampler
    nfes = as_tuple(sc.nfes, int)
    ref = ref or make_reference(testbed, int(ec.num_samples), int(config.seed), int(ec.batch_size))
    name = config.method or "student"
    ss = student_samplers(
        student,
        params,
        name,
        sc.grid,
        as_tuple(sc.gammas, float),
        sc.kind,
        int(ec.batch_size),
        int(config.seed),
        steps_kw_fn(config),
    )
    rows = reference_rows(testbed, ref, int(config.seed))
    rows += evaluate_samplers(testbed, ss, nfes, ref, log, keep=keep, keep_nfes=nfes)
    grid_kind = default_grid(testbed.teacher.path.name) if ec.grid == "auto" else ec.grid
    tsamp = solver_samplers(
        testbed.teacher, teacher_solvers, grid_kind, int(ec.batch_size), testbed.singular_at_data
    )
    rows += evaluate_samplers(
        testbed, {f"teacher {k}": v for k, v in tsamp.items()}, nfes, ref, log, keep=keep, keep_nfes=nfes
    )
    if keep is not None:
        keep["teacher (converged)"] = {"exact": ref.x0}
    return rows


def distill_report(config, workdir: str, student, params, testbed, wall_seconds: float) -> list[dict]:
    """Evaluates the student and writes ``eval.json`` + ``report.md`` with figures into ``workdir``."""
    from fewstep_jax.evaluation.tables import write_json
    from fewstep_jax.train import writers

    t0 = time.time()
    keep: dict = {}
    rows = evaluate_distilled(config, student, params, testbed, keep=keep)
    cost = {
        "steps": int(config.train.num_steps),
        "batch": int(config.train.batch_size),
        "train_seconds": round(wall_seconds, 1),
        "eval_seconds": round(time.time() - t0, 1),
    }
    for r in rows:
        if r["method"].startswith(config.method or "student"):
            r.update(cost)
    write_json(os.path.join(workdir, "eval.json"), {"rows": rows, "cost": cost})
    figs = {}
    panels = {m: by for m, by in keep.items()}
    figs["Samples per NFE"] = report.plot_samples(
        panels,
        os.path.join(workdir, "samples.png"),
        reference=None if testbed.is_image else testbed.reference["x"],
    )
    if not testbed.is_image and len(testbed.teacher.data_shape) == 1:
        x1 = jnp.asarray(
            np.asarray(testbed.teacher.prior(jax.random.PRNGKey(1), 300)) / student.path.prior_scale
        )
        grid = solvers.make_grid(config.sampler.grid, 4, student.path)
        kw = (steps_kw_fn(config) or (lambda n: {}))(4) or {}
        _, traj = samplers.sample(student, params, x1, grid, return_trajectory=True, **kw)
        g_t = solvers.make_grid(default_grid(testbed.teacher.path.name), 32, testbed.teacher.path)
        _, traj_t = testbed.teacher.solve(x1 * student.path.prior_scale, g_t, "rk4", return_trajectory=True)
        figs["Trajectories"] = report.plot_trajectories(
            {"student, 4 jumps": np.asarray(traj), "teacher ODE": np.asarray(traj_t)},
            os.path.join(workdir, "trajectories.png"),
        )
    # the training loop already drew the loss curves of this run (train.loop.write_report)
    curve = os.path.join(workdir, "loss_curve.png")
    figs["Loss curves"] = (
        curve if os.path.exists(curve) else report.plot_loss_curves(writers.read_metrics(workdir), curve)
    )
    cols = ["method", "nfe", "flow_map_mse", *testbed.distance_names]
    notes = (
        f"`{config.method}` on `{testbed.name}` ({testbed.teacher.path.name} path): "
        f"{cost['steps']} student steps at batch {cost['batch']}, "
        f"{wall_seconds:.0f} s of training."
    )
    report.write_report(workdir, f"Distillation: {config.method} on {testbed.name}", rows, cols, figs, notes)
    return rows


__all__ = ["distill_report", "evaluate_distilled", "steps_kw_fn"]
