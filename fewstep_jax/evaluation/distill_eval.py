"""Evaluation and report of a distilled student, beside its teacher at the same NFE.

Rows (same format as the teacher-solver table): the student at ``config.sampler.nfes`` (for each
gamma), the teacher's Euler / Heun / DPM-Solver++(2M) at the same NFEs, the converged teacher and
the data floor; plus the distillation cost. ``report.md`` in the workdir shows the table, sample
grids per NFE, the student's trajectories (2-D) and the loss curves.

On a dataset testbed (:mod:`fewstep_jax.data_testbed`, no analytic teacher) there is no flow map
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
from fewstep_jax.evaluation import report
from fewstep_jax.evaluation.scoring import Reference, evaluate_samplers, make_reference, reference_rows
from fewstep_jax.evaluation.student_eval import student_condition, student_samplers
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
    teacher=None,
) -> list[dict]:
    """Rows of the student (eval-EMA ``params``) and of the teacher's solvers at the same NFEs.

    ``teacher``: the network teacher whose solvers a dataset testbed's rows show (an exact testbed
    uses its analytic teacher and ignores it)."""
    if testbed.teacher is None:
        return _dataset_rows(config, student, params, testbed, teacher, teacher_solvers, log, keep)
    ec, sc = config.eval, config.sampler
    nfes = as_tuple(sc.nfes, int)
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
        # a conditional reference (labels, CFG scale) conditions the student the same way
        student_condition(config, ref) if ref is not None else None,
    )
    ref = ref or make_reference(testbed, int(ec.num_samples), int(config.seed), int(ec.batch_size))
    rows = reference_rows(testbed, ref, int(config.seed))
    rows += evaluate_samplers(testbed, ss, nfes, ref, log, keep=keep, keep_nfes=nfes)
    rows += teacher_solver_rows(config, testbed, ref, teacher_solvers, nfes, log, keep)
    if keep is not None:
        keep["teacher (converged)"] = {"exact": ref.x0}
    return rows


def teacher_solver_rows(config, testbed, ref: Reference, methods, nfes, log=print, keep=None) -> list[dict]:
    """Rows of the teacher's fixed-step ``methods`` at ``nfes`` on the reference's noise and
    condition (labels, CFG scale), on ``config.eval.grid``; samples go to ``keep`` when given."""
    ec = config.eval
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
    from fewstep_jax.train import writers

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
    exact = testbed.teacher is not None
    cols = ["method", "nfe", *(["flow_map_mse"] if exact else []), *testbed.distance_names]
    notes = (
        f"`{config.method}` on `{testbed.name}` ({student.path.name} path): "
        f"{cost['steps']} student steps at batch {cost['batch']}, "
        f"{wall_seconds:.0f} s of training."
    )
    if not exact:
        notes += (
            f" Real dataset, no exact flow map: {', '.join(testbed.distance_names)} on "
            f"{config.eval.num_samples} samples."
            if testbed.distance_names
            else " Real dataset, FID off (set eval.fid_inception and eval.fid_reference): samples only."
        )
    report.write_report(workdir, f"Distillation: {config.method} on {testbed.name}", rows, cols, figs, notes)
    return rows


__all__ = ["distill_report", "evaluate_distilled", "steps_kw_fn"]
