"""The main job (mode ``pipeline``): teacher -> few-step students of every method -> one report.

``run(config, workdir)`` runs resumable stages, each in its own folder of ``workdir``:

* ``teacher_<path>/``: the testbed's exact analytic teacher on a path, the shared evaluation
  noise and its exact flow map (adaptive RK45; ``harness.shared_reference``) and the teacher's
  solvers at the student NFEs (``harness.teacher_solver_rows``). One per path the students live
  on (TCD / LCM move an ``rf`` testbed to the ``ddpm`` path, so their rows sit beside the ``ddpm``
  teacher).
* ``<method>/``: ``modes.distill.distill`` of the recipe ``method`` (``fewstep_jax/recipes``) with
  the pipeline's budget (resumes from its checkpoints), then the student scored on its path's
  reference (``harness.student_rows``) and its 4-jump trajectories (2-D data).
* the report in ``workdir``: ``report.md`` (one table: every student at NFE 1/2/4 beside the
  teacher's solvers at the same NFE and the converged teacher), ``samples.png`` (methods x NFE
  + exact), ``trajectories.png`` (2-D), ``loss_curves.png`` and ``pipeline.json`` (the rows).

A stage writes ``stage.json`` (its rows and a fingerprint of its config) last; a rerun skips a
stage whose ``stage.json`` matches, and an interrupted training stage resumes from its last
checkpoint. Methods of ``config.pipeline.methods`` that have no recipe yet are skipped (and named
in the report).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import samplers, solvers
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.evaluation import harness, report
from fewstep_jax.evaluation.scoring import Reference, reference_rows
from fewstep_jax.evaluation.student_eval import steps_kw_fn
from fewstep_jax.evaluation.tables import pivot_markdown, write_json
from fewstep_jax.runs import writers

TRAJECTORY_NFE = 4
TEACHER_ODE_STEPS = 32


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def available_methods(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(methods of ``config.pipeline.methods`` that have a recipe, those that do not yet)."""
    from fewstep_jax.recipes import RECIPES

    wanted = as_tuple(config.pipeline.methods)
    if not wanted:
        raise ValueError("config.pipeline.methods is empty: name at least one recipe (fewstep_jax/recipes)")
    return tuple(m for m in wanted if m in RECIPES), tuple(m for m in wanted if m not in RECIPES)


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The distill config of ``method``: the testbed's network/batch (fewstep_jax/recipes/testbeds.py)
    with the pipeline's budget, the recipe, and the pipeline's testbed, seed, eval and I/O settings."""
    from fewstep_jax.recipes import apply_recipe, base
    from fewstep_jax.recipes.testbeds import apply_testbed

    pc = config.pipeline
    c = base.get_config()
    apply_testbed(c, config.testbed.name, int(pc.steps) or None)
    if int(pc.batch_size) > 0:
        c.train.batch_size = int(pc.batch_size)
    # before the recipe: it reads the path (TCD moves rf to ddpm) and the budget (TDM's warm-up)
    c.testbed = ml_collections.ConfigDict(config.testbed.to_dict())
    c.seed = int(config.seed)
    apply_recipe(c, method)
    for key in ("num_samples", "batch_size", "grid"):
        c.eval[key] = config.eval[key]
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoints"):
        c.train[key] = config.train[key]
    c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    nfes = as_tuple(config.sampler.nfes, int)
    c.sampler.nfes = tuple(n for n in as_tuple(c.sampler.nfes, int) if n in nfes)
    return c


def _fingerprint(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _config_json(c: ml_collections.ConfigDict) -> Any:
    return json.loads(c.to_json_best_effort())


# ---------------------------------------------------------------------------------------------
# stage results on disk
# ---------------------------------------------------------------------------------------------


def _load_stage(folder: str, fingerprint: str) -> tuple[dict, dict] | None:
    """(stage.json, arrays of stage.npz) when the stage is done with this fingerprint."""
    meta_path, arr_path = os.path.join(folder, "stage.json"), os.path.join(folder, "stage.npz")
    if not (os.path.exists(meta_path) and os.path.exists(arr_path)):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
        return None
    with np.load(arr_path) as z:
        return meta, {k: z[k] for k in z.files}


def _save_stage(folder: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """stage.npz, then stage.json (the marker that the stage is done)."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "stage.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(folder, "stage.npz"))
    write_json(os.path.join(folder, "stage.json"), meta)


def _pack_samples(keep: dict) -> dict[str, np.ndarray]:
    return {f"samples|{name}|{nfe}": np.asarray(x) for name, by in keep.items() for nfe, x in by.items()}


def _unpack_samples(arrays: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, x in arrays.items():
        if key.startswith("samples|"):
            _, name, nfe = key.split("|")
            out.setdefault(name, {})[int(nfe) if nfe.isdigit() else nfe] = x
    return out


class _Prefixed(io.TextIOBase):
    """A stdout that starts every line with ``prefix`` (the stage's progress: ``[2/3] tcd: step
    300/1500 | ...``)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, s: str) -> int:
        for part in s.splitlines(keepends=True):
            if self.at_start and part.strip():
                self.stream.write(self.prefix)
            self.stream.write(part)
            self.at_start = part.endswith("\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _prefixed(prefix: str):
    return contextlib.redirect_stdout(_Prefixed(sys.stdout, prefix))


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def _trajectory_noise(ref: Reference, n: int) -> np.ndarray:
    return ref.x1[:n]


def teacher_stage(config, c_method, testbed, folder: str, log=print) -> tuple[Reference, dict, dict]:
    """The shared reference of a path, the teacher's solver rows and figures' samples (cached)."""
    from fewstep_jax.solvers import default_grid

    ec, pc = config.eval, config.pipeline
    nfes = as_tuple(config.sampler.nfes, int)
    solver_names = as_tuple(pc.teacher_solvers)
    fp = _fingerprint(
        _config_json(c_method.testbed), int(config.seed), ec.num_samples, ec.batch_size, ec.grid, nfes,
        solver_names, int(pc.trajectory_samples),
    )  # fmt: skip
    done = _load_stage(folder, fp)
    if done is not None:
        meta, arrays = done
        r = meta["reference"]
        ref = Reference(arrays["x1"], arrays["x0"], r["nfe"], r["mse_vs_tighter"], r["seconds"])
        log(f"done (stage.json of {folder}): reference NFE {ref.nfe}, skipped")
        return ref, meta, arrays
    t0, cpu0 = time.time(), time.process_time()
    ref = harness.shared_reference(config, testbed)
    log(f"exact reference of {len(ref.x1)} samples: adaptive NFE {ref.nfe} ({ref.seconds:.0f} s)")
    path = testbed.teacher.path.name
    keep: dict = {}
    rows = reference_rows(testbed, ref, int(config.seed))
    rows += harness.teacher_solver_rows(config, testbed, ref, solver_names, nfes, log, keep)
    for r in rows:
        r["method"] = f"{r['method']} [{path}]"
        r["path"] = path
    arrays = {"x1": ref.x1, "x0": ref.x0, **_pack_samples(keep)}
    if testbed.reference["x"].ndim == 2:  # the teacher's ODE, for the trajectory figure
        g = solvers.make_grid(default_grid(path), TEACHER_ODE_STEPS, testbed.teacher.path)
        x1 = jnp.asarray(_trajectory_noise(ref, int(pc.trajectory_samples)))
        _, traj = testbed.teacher.solve(x1, g, "rk4", return_trajectory=True)
        arrays["trajectory"] = np.asarray(traj)
    meta = {
        "fingerprint": fp,
        "path": path,
        "rows": rows,
        "reference": {"nfe": ref.nfe, "mse_vs_tighter": ref.mse_vs_tighter, "seconds": ref.seconds},
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }
    _save_stage(folder, meta, arrays)
    log(f"stage done in {meta['seconds']:.0f} s ({meta['cpu_seconds']:.0f} s CPU)")
    return ref, meta, arrays


def method_stage(
    c,
    method: str,
    testbed,
    ref: Reference,
    ref_fp: str,
    folder: str,
    trajectory_samples: int = 300,
    log=print,
) -> tuple[dict, dict]:
    """Trains (or resumes) ``method`` in ``folder`` and scores it on ``ref`` (cached): (stage.json
    content, arrays: the samples at the kept NFEs and the 4-jump trajectory of 2-D data)."""
    from fewstep_jax.modes.distill import distill

    fp = _fingerprint(_config_json(c), ref_fp)
    done = _load_stage(folder, fp)
    if done is not None:
        log(f"done (stage.json of {folder}): {c.train.num_steps} steps, skipped")
        return done
    cpu0 = time.process_time()
    d = distill(c, folder, evaluate=False)
    step = int(jax.device_get(d.state.step))
    if step < int(c.train.num_steps):  # preempted: the checkpoint is saved, the stage is not done
        raise SystemExit(f"{method} stopped at step {step} of {c.train.num_steps}; rerun to resume")
    t0 = time.time()
    params = d.params()
    keep: dict = {}
    rows = harness.student_rows(c, d.student, params, testbed, ref, log, keep)
    path = testbed.teacher.path.name
    for r in rows:
        r.update(
            path=path,
            steps=int(c.train.num_steps),
            batch=int(c.train.batch_size),
            train_seconds=round(d.train_seconds, 1),
        )
    arrays = _pack_samples(keep)
    if testbed.reference["x"].ndim == 2:  # the student's 4-jump chain from the same noise
        x1 = jnp.asarray(_trajectory_noise(ref, trajectory_samples) / d.student.path.prior_scale)
        grid = solvers.make_grid(c.sampler.grid, TRAJECTORY_NFE, d.student.path)
        kw = (steps_kw_fn(c) or (lambda _: {}))(TRAJECTORY_NFE)
        if kw is not None:
            _, traj = samplers.sample(d.student, params, x1, grid, return_trajectory=True, **kw)
            arrays["trajectory"] = np.asarray(traj)
    meta = {
        "fingerprint": fp,
        "method": method,
        "path": path,
        "rows": rows,
        "train_seconds": d.train_seconds,
        "eval_seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }
    _save_stage(folder, meta, arrays)
    log(
        f"stage done: {d.train_seconds:.0f} s training, {meta['eval_seconds']:.0f} s evaluation "
        f"({meta['cpu_seconds']:.0f} s CPU)"
    )
    return meta, arrays


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _ordered_rows(teacher_rows: list[dict], student_rows: list[dict], nfes) -> list[dict]:
    """Per path: the converged teacher and the data floor, then per NFE the students beside the
    teacher's solvers."""
    out = []
    for path in dict.fromkeys(r["path"] for r in teacher_rows):
        t = [r for r in teacher_rows if r["path"] == path]
        s = [r for r in student_rows if r["path"] == path]
        out += [r for r in t if r["method"].startswith(("teacher (", "data ("))]
        for nfe in nfes:
            out += [r for r in s if r["nfe"] == nfe]
            out += [r for r in t if r["nfe"] == nfe and not r["method"].startswith(("teacher (", "data ("))]
    return out


def write_pipeline_report(
    workdir: str,
    testbed,
    teachers: dict[str, tuple[dict, dict]],
    students: dict[str, tuple[dict, dict]],
    skipped: tuple[str, ...],
    nfes: tuple[int, ...],
    wall_seconds: float,
    cpu_seconds: float = float("nan"),
) -> str:
    """report.md + samples.png, trajectories.png (2-D), loss_curves.png, pipeline.json."""
    teacher_rows = [r for meta, _ in teachers.values() for r in meta["rows"]]
    student_rows = [r for meta, _ in students.values() for r in meta["rows"]]
    rows = _ordered_rows(teacher_rows, student_rows, nfes)
    figs: dict[str, str | None] = {}
    # samples: each student's first sampler (gamma 0 when it has one), then per path the
    # strongest teacher solver and the exact flow map
    panels: dict[str, dict] = {}
    for method, (_, arrays) in students.items():
        by_name = _unpack_samples(arrays)
        if by_name:
            name = method if method in by_name else sorted(by_name)[0]
            panels[name] = by_name[name]
    for path, (_, arrays) in teachers.items():
        by_name = _unpack_samples(arrays)
        best = next((n for n in ("teacher dpmpp_2m", "teacher euler") if n in by_name), None)
        if best is None and by_name:
            best = sorted(by_name)[0]
        # the exact flow map of the same noise as the teacher row's last column
        panels[f"{best or 'teacher'} [{path}]"] = {**(by_name[best] if best else {}), "exact": arrays["x0"]}
    is_2d = testbed.reference["x"].ndim == 2
    figs["Samples per NFE (rows: methods; columns: NFE, then the exact flow map)"] = report.plot_samples(
        panels, os.path.join(workdir, "samples.png"), reference=testbed.reference["x"] if is_2d else None
    )
    if is_2d:
        trajs = {f"{m}, {TRAJECTORY_NFE} jumps": a.get("trajectory") for m, (_, a) in students.items()}
        trajs.update({f"teacher ODE [{p}]": a.get("trajectory") for p, (_, a) in teachers.items()})
        trajs = {k: v for k, v in trajs.items() if v is not None}
        figs["Trajectories (noise -> data)"] = report.plot_trajectories(
            trajs, os.path.join(workdir, "trajectories.png")
        )
    records = []
    for method in students:
        for r in writers.read_metrics(os.path.join(workdir, method)):
            if "loss" in r:
                records.append({"step": r["step"], f"{method}: loss": r["loss"]})
    figs["Loss curves (total loss of each method)"] = report.plot_loss_curves(
        records, os.path.join(workdir, "loss_curves.png")
    )
    dist = list(testbed.distance_names)
    cols = ["method", "path", "nfe", "flow_map_mse", *dist, "steps", "batch", "train_seconds"]
    ran = ", ".join(f"`{m}`" for m in students) or "none"
    notes = [
        f"Testbed `{testbed.name}` with its exact analytic teacher. Students: {ran}"
        + (f"; skipped (no recipe yet): {', '.join(f'`{m}`' for m in skipped)}" if skipped else "")
        + f". This run: {wall_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU (stages done before are skipped).",
        "",
        "`flow_map_mse`: mean squared distance to the exact flow map Phi(x1, 1, 0) of the same "
        "noise on the method's path (in brackets); "
        + ", ".join(f"`{d}`" for d in dist)
        + ": sample distances to exact data (lower is better; `data (same size)` is the floor).",
        "",
    ]
    for value in ("flow_map_mse", *dist[:1]):
        at_nfes = [r for r in rows if r["nfe"] in nfes]
        table = pivot_markdown(at_nfes, value, list(nfes), index=("method",))
        notes += [f"**{value}** by NFE:", "", table, ""]
    costs = [(f"teacher [{p}]", m) for p, (m, _) in teachers.items()]
    costs += [(k, m) for k, (m, _) in students.items()]
    notes += [
        "Stage cost (CPU seconds when the stage ran): "
        + ", ".join(f"{name} {m.get('cpu_seconds', float('nan')):.0f}" for name, m in costs)
        + ".",
        "",
        "All rows:",
    ]
    write_json(os.path.join(workdir, "pipeline.json"), {
        "rows": rows,
        "methods": list(students),
        "skipped": list(skipped),
        "wall_seconds": wall_seconds,
        "cpu_seconds": cpu_seconds,
    })  # fmt: skip
    return report.write_report(
        workdir, f"Few-step distillation on {testbed.name}", rows, cols, figs, "\n".join(notes)
    )


# ---------------------------------------------------------------------------------------------
# the mode
# ---------------------------------------------------------------------------------------------


def _quiet_library_logs() -> None:
    """Keeps the stage progress readable: absl INFO logs (orbax writes dozens per checkpoint) are
    shown only when ``--verbosity`` is given on the command line."""
    from absl import flags, logging

    if flags.FLAGS.is_parsed() and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Mode ``pipeline``: every stage (resuming what is done), then the report; returns
    ``pipeline.json``'s content."""
    from fewstep_jax.testbeds import make_testbed_from_config

    if config.teacher.workdir:
        raise ValueError(
            "the pipeline scores students against the testbed's exact analytic teacher; "
            f"config.teacher.workdir={config.teacher.workdir!r} must be empty"
        )
    t0, cpu0 = time.time(), time.process_time()
    _quiet_library_logs()
    methods, skipped = available_methods(config)
    if skipped:
        print(f"methods without a recipe yet (skipped): {', '.join(skipped)}", flush=True)
    if not methods:
        raise ValueError(f"none of config.pipeline.methods={as_tuple(config.pipeline.methods)} has a recipe")
    os.makedirs(workdir, exist_ok=True)
    configs = {m: method_config(config, m) for m in methods}
    paths = list(dict.fromkeys(c.testbed.path for c in configs.values()))
    total = len(paths) + len(methods)
    k = 0
    testbeds, teachers, refs = {}, {}, {}
    for path in paths:
        k += 1
        c = next(c for c in configs.values() if c.testbed.path == path)
        print(f"[{k}/{total}] teacher [{path}]: exact reference and solvers", flush=True)
        testbeds[path] = make_testbed_from_config(c)
        with _prefixed(f"[{k}/{total}] teacher [{path}]: "):
            folder = os.path.join(workdir, f"teacher_{path}")
            ref, meta, arrays = teacher_stage(config, c, testbeds[path], folder)
        teachers[path], refs[path] = (meta, arrays), ref
    students = {}
    for method, c in configs.items():
        k += 1
        path = c.testbed.path
        print(
            f"[{k}/{total}] {method}: {c.train.num_steps} steps at batch {c.train.batch_size} "
            f"on the {path} path -> {os.path.join(workdir, method)}",
            flush=True,
        )
        with _prefixed(f"[{k}/{total}] {method}: "):
            students[method] = method_stage(
                c, method, testbeds[path], refs[path], teachers[path][0]["fingerprint"],
                os.path.join(workdir, method), int(config.pipeline.trajectory_samples),
            )  # fmt: skip
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    nfes = as_tuple(config.sampler.nfes, int)
    path = write_pipeline_report(workdir, testbeds[paths[0]], teachers, students, skipped, nfes, wall, cpu)
    print(f"report: {path} ({wall:.0f} s wall, {cpu:.0f} s CPU in this run)", flush=True)
    with open(os.path.join(workdir, "pipeline.json")) as f:
        return json.load(f)


__all__ = [
    "available_methods",
    "method_config",
    "method_stage",
    "run",
    "teacher_stage",
    "write_pipeline_report",
]
