"""Evaluation and report of a distilled student, beside its teacher at the same NFE.

Rows (same format as the teacher-solver table): the student at ``config.sampler.nfes`` (for each
gamma), the teacher's Euler / Heun / DPM-Solver++(2M) at the same NFEs, the converged teacher and
the data floor; plus the distillation cost. ``report.md`` in the workdir shows the table, sample
grids per NFE, the student's trajectories (2-D) and the loss curves.

On a dataset testbed (:mod:`fewstep_jax.testbeds.dataset`, no analytic teacher) there is no flow map
to compare with: the rows are the student and the network teacher's solvers (``teacher=``) at the
same NFEs on the same noise, with the testbed's distances (FID when configured, else none).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import samplers, solvers
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.evaluation import harness, report
from fewstep_jax.evaluation.scoring import Reference, reference_rows
from fewstep_jax.evaluation.student_eval import steps_kw_fn, student_samplers
from fewstep_jax.evaluation.teacher_solvers import solver_samplers
from fewstep_jax.solvers import default_grid
from fewstep_jax.testbeds.base import Testbed


def evaluate_distilled(
    config,
    student,
    params,
    testbed: Testbed,
    ref: Reference | None = None,
    teacher_solvers=("euler", "heun", "dpmpp_2m"),
    log=print,
    keep: dict | None = None,
    teacher=None,
) -> list[dict]:
    """Rows of the student (eval-EMA ``params``) and of the teacher's solvers at the same NFEs:
    on an exact testbed the reference rows, the student's and the teacher's on ``ref`` (made from
    ``config`` when None, see :mod:`.harness`).

    ``teacher``: the network teacher whose solvers a dataset testbed's rows show (an exact testbed
    uses its analytic teacher and ignores it)."""
    if not testbed.has_exact_teacher:
        return _dataset_rows(config, student, params, testbed, teacher, teacher_solvers, log, keep)
    nfes = as_tuple(config.sampler.nfes, int)
    ref = ref or harness.shared_reference(config, testbed)
    rows = reference_rows(testbed, ref, int(config.seed))
    rows += harness.student_rows(config, student, params, testbed, ref, log, keep)
    rows += harness.teacher_solver_rows(config, testbed, ref, teacher_solvers, nfes, log, keep)
    if keep is not None:
        keep["teacher (converged)"] = {"exact": ref.x0}
    return rows


def _dataset_rows(config, student, params, testbed, teacher, teacher_solvers, log, keep) -> list[dict]:
    """Rows ``{testbed, method, nfe, <distances>}`` of a dataset testbed: the student's samplers and
    the network teacher's solvers on the same ``eval.num_samples`` noise (class-conditional
    networks: balanced labels, no guidance); the first 64 samples of each (method, NFE) go to
    ``keep``."""
    from fewstep_jax.evaluation.scoring import balanced_labels

    if teacher is None:
        raise ValueError(f"testbed {testbed.name!r} has no analytic teacher: pass the network teacher")
    ec, sc = config.eval, config.sampler
    nfes = as_tuple(sc.nfes, int)
    n, bs = int(ec.num_samples), int(ec.batch_size)
    x1 = np.asarray(teacher.prior(jax.random.PRNGKey(int(config.seed)), n))
    nc = int(config.model.get("num_classes", 0))
    label = balanced_labels(n, nc) if nc else None
    ss = student_samplers(
        student,
        params,
        config.method or "student",
        sc.grid,
        as_tuple(sc.gammas, float),
        sc.kind,
        bs,
        int(config.seed),
        steps_kw_fn(config),
        condition={"label": label} if nc else None,
    )
    grid_kind = default_grid(teacher.path.name) if ec.grid == "auto" else ec.grid
    t_label = balanced_labels(n, teacher.num_classes) if teacher.num_classes else None
    tsamp = solver_samplers(teacher, teacher_solvers, grid_kind, bs, testbed.singular_at_data, label=t_label)
    samplers_ = {**ss, **{f"teacher {k}": v for k, v in tsamp.items()}}
    if not testbed.distance_names:
        log(f"[{testbed.name}] no sample distance (FID off): samples only")
    rows = []
    for name, sampler in samplers_.items():
        for nfe in nfes:
            y = sampler(x1, nfe)
            if y is None:
                continue
            row = {"testbed": testbed.name, "method": name, "nfe": nfe, **testbed.distances(np.asarray(y))}
            rows.append(row)
            if keep is not None:
                keep.setdefault(name, {})[nfe] = np.asarray(y[:64])
            dists = " ".join(f"{k} {row[k]:.4g}" for k in testbed.distance_names)
            log(f"[{testbed.name}] {name:12s} NFE {nfe:3d}: {dists}")
    return rows


def distill_report(
    config, workdir: str, student, params, testbed, wall_seconds: float, teacher=None
) -> list[dict]:
    """Evaluates the student and writes ``eval.json`` + ``report.md`` with figures into ``workdir``
    (``teacher``: the network teacher of a dataset testbed, see :func:`evaluate_distilled`)."""
    from fewstep_jax.evaluation.tables import write_json
    from fewstep_jax.runs import writers

    t0 = time.time()
    keep: dict = {}
    solvers_ = as_tuple(config.eval.get("teacher_solvers", ("euler", "heun", "dpmpp_2m")))
    rows = evaluate_distilled(
        config, student, params, testbed, teacher_solvers=solvers_, keep=keep, teacher=teacher
    )
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
    exact = testbed.exact_teacher
    if exact is not None and not testbed.is_image and len(testbed.data_shape) == 1:
        x1 = jnp.asarray(np.asarray(exact.prior(jax.random.PRNGKey(1), 300)) / student.path.prior_scale)
        grid = solvers.make_grid(config.sampler.grid, 4, student.path)
        kw = (steps_kw_fn(config) or (lambda n: {}))(4) or {}
        _, traj = samplers.sample(student, params, x1, grid, return_trajectory=True, **kw)
        g_t = solvers.make_grid(default_grid(exact.path.name), 32, exact.path)
        _, traj_t = exact.solve(x1 * student.path.prior_scale, g_t, "rk4", return_trajectory=True)
        figs["Trajectories"] = report.plot_trajectories(
            {"student, 4 jumps": np.asarray(traj), "teacher ODE": np.asarray(traj_t)},
            os.path.join(workdir, "trajectories.png"),
        )
    # the run report the training loop was handed already drew this run's loss curves
    # (report.write_run_report)
    curve = os.path.join(workdir, "loss_curve.png")
    figs["Loss curves"] = (
        curve if os.path.exists(curve) else report.plot_loss_curves(writers.read_metrics(workdir), curve)
    )
    mse = ["flow_map_mse"] if testbed.has_exact_teacher else []
    cols = ["method", "nfe", *mse, *testbed.distance_names]
    notes = (
        f"`{config.method}` on `{testbed.name}` ({student.path.name} path): "
        f"{cost['steps']} student steps at batch {cost['batch']}, "
        f"{wall_seconds:.0f} s of training."
    )
    if not testbed.has_exact_teacher:
        notes += (
            f" Real dataset, no exact flow map: {', '.join(testbed.distance_names)} on "
            f"{config.eval.num_samples} samples."
            if testbed.distance_names
            else " Real dataset, FID off (set eval.fid_inception and eval.fid_reference): samples only."
        )
    report.write_report(workdir, f"Distillation: {config.method} on {testbed.name}", rows, cols, figs, notes)
    return rows


__all__ = ["distill_report", "evaluate_distilled", "steps_kw_fn"]  # steps_kw_fn: of .student_eval
