"""The distillation quality table: recipes x testbeds at equal budget, beside the teacher.

    python -m fewstep_jax.bench.distill --testbeds=gmm8,checker --recipes=traflow,cd,ctm \
        --steps=2000 --out=bench_results/distill_trajectory.json

One command makes one table: ``--out`` gets the JSON and a markdown file of the same stem
(``.md``) whose header records the exact command, the machine and the total seconds.

For every testbed one evaluation noise and one reference flow map are shared by every row. Each
recipe (fewstep_jax/recipes) is trained with the same number of student steps and batch, then scored
at its sampler's NFEs (``--nfes`` overrides; gammas with ``--gammas``): flow-map MSE against the
reference and sample distances to the testbed's data, beside the teacher's fixed-step solvers
(``--teacher_solvers``) at the same NFEs and the converged teacher (the reference itself).

Flags beyond the recipe and budget:

* ``--teacher_workdir=DIR``: distil from a ``train_teacher`` run (``config.teacher.workdir``; the
  student and aux networks take its architecture and initialise from its params). The reference is
  then that network's adaptive solve of the same noise, and the teacher rows are its solvers; the
  distances still go to the testbed's data. The cost gains the fraction of the teacher's own
  training (its ``train.num_steps`` and the ``wall_seconds`` of its ``teacher_eval.json``).
* ``--guidance=W``: classifier-free guidance at the Imagen scale ``W`` (``teacher.predict``'s
  convention): the reference and the teacher rows are the guided teacher with balanced labels
  (``0..K-1`` repeated), students get the same labels and, when they have a guidance input, LCM's
  ``w' = W - 1`` (what tcd / lcm with ``guidance_embed`` train on); every distance is per class,
  averaged over the classes (``scoring.class_distances``). A class-conditional student
  (``model.num_classes > 0``) is always scored this way, at ``W = 1`` when the flag is absent.
* ``--set key=value`` (repeatable): a config override of every run, dotted keys, values read as
  Python literals when they parse (``--set eval.num_samples=500 --set testbed.path=ddpm``).

Cost columns of a student row: ``steps``, ``batch``, ``wall_seconds`` (the whole ``distill`` call:
teacher pairs, compilation and training; ``train_seconds`` is the training loop alone),
``teacher_nfe`` = total teacher network evaluations of single examples spent by the run: the mean
over the logged steps of the per-step metric ``teacher_nfe`` (summed over the loss terms: mean
teacher evaluations per training example) x steps x batch, plus the evaluations of generating
teacher pairs (reflow); blank when the losses do not report it. ``teacher_nfe_per_step`` is that
per-example mean. With ``--teacher_workdir``: ``teacher_steps_frac`` (student steps / teacher
steps) and ``teacher_seconds_frac`` (wall_seconds / the teacher's training wall seconds).

JSON: ``{command, argv, machine, seconds, steps, recipes, nfes, gammas, guidance, sets,
teacher_workdir, teacher, testbeds: {name: {rows, reference_nfe, reference}}}``; ``reference`` =
``{teacher, nfe, mse_vs_tighter, seconds, guidance, per_class, num_classes}``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path as FilePath

import ml_collections
import numpy as np

from fewstep_jax.bench.solvers import machine
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.errors import UserError, run_cli
from fewstep_jax.evaluation import harness
from fewstep_jax.evaluation.tables import markdown_table, pivot_markdown, write_json

PROG = "python -m fewstep_jax.bench.distill"
TEACHER_SOLVERS = ("euler", "heun", "dpmpp_2m")
REFERENCE_METHODS = ("teacher (converged)", "data (same size)")  # rows of scoring.reference_rows
# model keys that belong to the student, not to the architecture it shares with its teacher
STUDENT_BRANCHES = ("use_s", "use_guidance", "guidance_embed_dim", "num_step_classes", "dropout")


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def parse_value(text: str):
    """A ``--set`` value: a Python literal when it parses (``3``, ``1e-3``, ``(1, 2)``, ``True``),
    else the string itself (``ddpm``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(items) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; an item without ``=`` is a ValueError."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets dotted keys of ``c`` in place; a key the config does not have is a ValueError naming it."""
    for k, v in (overrides or {}).items():
        node = c
        *head, last = k.split(".")
        try:
            for h in head:
                node = node[h]
            if last not in node:
                raise KeyError(last)
            node[last] = v
        except (KeyError, AttributeError, TypeError) as e:
            raise UserError(f"config override {k}={v!r}: {type(e).__name__} {e}") from e


def load_distill_config(testbed: str, recipe: str, steps: int | None, overrides: dict | None = None):
    """:func:`fewstep_jax.recipes.distill_config` of ``testbed`` and ``recipe``, plus overrides."""
    from fewstep_jax.recipes import distill_config

    c = distill_config(testbed, recipe, steps or None)
    apply_overrides(c, overrides)
    return c


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """A ``train_teacher`` workdir: the network teacher, its resolved config and its cost."""

    workdir: str
    teacher: object  # fewstep_jax.teachers.base.Teacher
    config: ml_collections.ConfigDict
    steps: int
    batch: int
    wall_seconds: float | None  # from teacher_eval.json (None when absent)


def load_teacher_run(workdir: str) -> TeacherRun:
    """The teacher of ``workdir`` (eval-EMA params of its newest checkpoint) and its training cost."""
    from fewstep_jax.teachers.neural import load_teacher_from_workdir

    wd = FilePath(workdir).absolute()
    teacher = load_teacher_from_workdir(wd)  # FileNotFoundError naming what is missing
    config = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
    ev = wd / "teacher_eval.json"
    wall = json.loads(ev.read_text()).get("wall_seconds") if ev.is_file() else None
    return TeacherRun(
        str(wd),
        teacher,
        config,
        int(config.train.num_steps),
        int(config.train.batch_size),
        None if wall is None else float(wall),
    )


def _teacher_architecture(student_model, teacher_model) -> ml_collections.ConfigDict:
    new = ml_collections.ConfigDict(ml_collections.ConfigDict(teacher_model).to_dict())
    for k in STUDENT_BRANCHES:
        if k in student_model:
            new[k] = student_model[k]
    return new


def adopt_teacher(c: ml_collections.ConfigDict, run: TeacherRun) -> None:
    """Points a distill config at a trained teacher: ``teacher.workdir``, the teacher's path, and its
    architecture for the student and every aux network (their own branches, e.g. ``use_s``, kept),
    so that both initialise from its params. A teacher of another testbed is a ValueError."""
    tc = run.config
    if tc.testbed.name != c.testbed.name:
        raise ValueError(
            f"teacher {run.workdir} was trained on testbed {tc.testbed.name!r}, not {c.testbed.name!r}"
        )
    c.teacher.workdir = run.workdir
    c.testbed.path = tc.testbed.path
    c.model = _teacher_architecture(c.model, tc.model)
    for name in c.aux_nets:
        if "model" in c.aux_nets[name]:
            c.aux_nets[name].model = _teacher_architecture(c.aux_nets[name].model, tc.model)


def run_config(
    testbed: str,
    recipe: str,
    steps: int | None = None,
    teacher_run: TeacherRun | None = None,
    nfes=None,
    gammas=None,
    sets: dict | None = None,
) -> ml_collections.ConfigDict:
    """One run's config: recipe on testbed, the trained teacher, ``--nfes`` / ``--gammas``, then the
    ``--set`` overrides (last word) on the locked config."""
    c = load_distill_config(testbed, recipe, steps)
    if teacher_run is not None:
        adopt_teacher(c, teacher_run)
    if nfes:
        c.sampler.nfes = tuple(int(n) for n in nfes)
    if gammas:
        c.sampler.gammas = tuple(float(g) for g in gammas)
    c.lock()
    apply_overrides(c, sets)
    return c


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------


def teacher_nfe_per_step(metric_rows) -> float | None:
    """Mean over the logged steps of the summed ``teacher_nfe`` metrics (``<term>/teacher_nfe``,
    ``<aux>/<term>/teacher_nfe``): teacher evaluations per training example per step; None when
    no row has one."""
    per = [
        sum(v for k, v in r.items() if k == "teacher_nfe" or k.endswith("/teacher_nfe"))
        for r in metric_rows
        if any(k == "teacher_nfe" or k.endswith("/teacher_nfe") for k in r)
    ]
    return float(np.mean(per)) if per else None


def pairs_teacher_nfe(c: ml_collections.ConfigDict) -> int | None:
    """Teacher evaluations of generating a pairs run's (noise, sample) pairs (0 without pairs; None
    for adaptive pairs, whose NFE is not recorded)."""
    from fewstep_jax import solvers

    if c.student.data != "pairs":
        return 0
    pc = dict(c.student.get("pairs", None) or {})
    method = pc.get("solver", "heun")
    if method == "adaptive":
        return None
    return int(pc.get("num", 10_000)) * solvers.nfe_of(method, int(pc.get("steps", 32)))


def distill_cost(
    c: ml_collections.ConfigDict,
    workdir: str,
    wall_seconds: float,
    train_seconds: float,
    teacher_run: TeacherRun | None = None,
) -> dict:
    """The cost cells of a student row (see the module docstring)."""
    from fewstep_jax.runs.writers import read_metrics

    steps, batch = int(c.train.num_steps), int(c.train.batch_size)
    cost = {
        "steps": steps,
        "batch": batch,
        "wall_seconds": round(wall_seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }
    per = teacher_nfe_per_step(read_metrics(workdir))
    pairs = pairs_teacher_nfe(c)
    if per is not None and pairs is not None:
        cost["teacher_nfe_per_step"] = per
        cost["teacher_nfe"] = per * steps * batch + pairs
    if teacher_run is not None:
        cost["teacher_steps_frac"] = steps / teacher_run.steps
        if teacher_run.wall_seconds:
            cost["teacher_seconds_frac"] = wall_seconds / teacher_run.wall_seconds
    return cost


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def testbed_reference(
    c,
    teacher_run: TeacherRun | None,
    guidance: float | None,
    conditional: bool,
    pooled: bool = False,
    rtol: float = 1e-5,
):
    """The testbed (its teacher replaced by the trained one) and the shared reference: the teacher's
    adaptive solve of ``eval.num_samples`` noises, conditional (balanced labels, CFG ``guidance``)
    when asked, scored per class unless ``pooled``."""
    from fewstep_jax.evaluation.scoring import balanced_labels
    from fewstep_jax.testbeds import make_testbed_from_config

    testbed = make_testbed_from_config(c)
    if teacher_run is not None:
        testbed = dataclasses.replace(testbed, teacher=teacher_run.teacher)
    n = int(c.eval.num_samples)
    label = None
    if conditional:
        k = int(testbed.teacher.num_classes)
        if k <= 0:
            raise ValueError(
                f"--guidance / a class-conditional student needs a conditional teacher; "
                f"{testbed.teacher.name!r} on {testbed.name!r} is unconditional"
            )
        label = balanced_labels(n, k)
    g = 1.0 if guidance is None else float(guidance)
    return testbed, harness.shared_reference(c, testbed, label, g, per_class=not pooled, rtol=rtol)


def run(
    testbeds,
    recipes,
    steps=None,
    out="bench_results/distill.json",
    workdir_root=None,
    log=print,
    *,
    teacher_workdir: str | None = None,
    guidance: float | None = None,
    sets: dict | None = None,
    nfes=None,
    gammas=None,
    teacher_solvers=TEACHER_SOLVERS,
    command: str | None = None,
    pooled: bool = False,
    reference_rtol: float = 1e-5,
) -> dict:
    """Trains and scores every recipe on every testbed; writes ``out`` (JSON) and its ``.md``."""
    from fewstep_jax.evaluation.scoring import reference_rows
    from fewstep_jax.evaluation.student_eval import student_condition
    from fewstep_jax.modes.distill import distill

    t0 = time.time()
    teacher_run = load_teacher_run(teacher_workdir) if teacher_workdir else None
    root = workdir_root or tempfile.mkdtemp(prefix="fewstep_bench_")
    results = {}
    for tb in testbeds:
        configs = {r: run_config(tb, r, steps, teacher_run, nfes, gammas, sets) for r in recipes}
        first = configs[recipes[0]]
        for r, c in configs.items():  # one reference per testbed: every run must share its setting
            for key in ("testbed.path", "seed", "eval.num_samples"):
                a, b = _get(c, key), _get(first, key)
                if a != b:
                    raise ValueError(
                        f"recipes {recipes[0]!r} and {r!r} differ in {key} ({b!r} vs {a!r}) on {tb}: "
                        "they cannot share one reference; run them separately"
                    )
        classes = {r: int(c.model.get("num_classes", 0)) for r, c in configs.items()}
        conditional = guidance is not None or any(k > 0 for k in classes.values())
        unconditional = [r for r, k in classes.items() if k <= 0]
        if conditional and unconditional:
            raise ValueError(
                f"--guidance / a class-conditional reference needs class-conditional students; "
                f"{unconditional} have model.num_classes=0 (use a *_cfg recipe or --set model.num_classes=K)"
            )
        testbed, ref = testbed_reference(first, teacher_run, guidance, conditional, pooled, reference_rtol)
        for c in configs.values():  # fail before training when a student cannot take the condition
            student_condition(c, ref)
        log(
            f"[{tb}] reference: {testbed.teacher.name} adaptive, {ref.nfe} NFE"
            + (f", CFG scale {ref.guidance:g}" if ref.label is not None else "")
            + (", per class" if ref.label is not None and ref.per_class else "")
        )
        rows = reference_rows(testbed, ref, int(first.seed))
        all_nfes: set[int] = set()
        for recipe, c in configs.items():
            log(f"== {tb} / {recipe}: {c.train.num_steps} steps at batch {c.train.batch_size}")
            wd = os.path.join(root, f"{tb}_{recipe}")
            t_run = time.time()
            d = distill(c, wd, evaluate=False)
            wall = time.time() - t_run
            cost = distill_cost(c, wd, wall, d.train_seconds, teacher_run)
            rs = harness.student_rows(c, d.student, d.params(), testbed, ref, log)
            rows += [dict(r, **cost) for r in rs]
            all_nfes |= set(as_tuple(c.sampler.nfes, int))
        rows += harness.teacher_solver_rows(first, testbed, ref, teacher_solvers, sorted(all_nfes), log)
        results[tb] = {
            "rows": rows,
            "reference_nfe": ref.nfe,
            "reference": {
                "teacher": testbed.teacher.name,
                "nfe": ref.nfe,
                "mse_vs_tighter": ref.mse_vs_tighter,
                "seconds": round(ref.seconds, 1),
                "guidance": ref.guidance,
                "per_class": ref.label is not None and ref.per_class,
                "num_classes": int(testbed.teacher.num_classes) if ref.label is not None else 0,
                "path": testbed.teacher.path.name,
                "num_samples": len(ref.x1),
            },
        }
    payload = {
        "command": command or _command(None),
        "machine": machine(),
        "seconds": time.time() - t0,
        "steps": steps,
        "recipes": list(recipes),
        "nfes": list(nfes) if nfes else None,
        "gammas": list(gammas) if gammas else None,
        "guidance": guidance,
        "pooled": pooled,
        "reference_rtol": reference_rtol,
        "sets": dict(sets or {}),
        "teacher_workdir": teacher_run.workdir if teacher_run else None,
        "teacher": None
        if teacher_run is None
        else {
            "name": teacher_run.teacher.name,
            "steps": teacher_run.steps,
            "batch": teacher_run.batch,
            "wall_seconds": teacher_run.wall_seconds,
        },
        "testbeds": results,
    }
    write_json(out, payload)
    md = os.path.splitext(out)[0] + ".md"
    text = markdown_report(payload)
    with open(md, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out} and {md} ({payload['seconds']:.0f} s on {payload['machine']})")
    return payload


def _get(c, dotted: str):
    node = c
    for k in dotted.split("."):
        node = node[k]
    return node


def table_columns(rows, distance_names, with_fraction: bool) -> list[str]:
    """Row columns of the markdown table: quality, then cost (the fractions with a trained teacher)."""
    cols = ["method", "nfe", "flow_map_mse", *distance_names, "steps", "batch", "wall_seconds", "teacher_nfe"]
    if with_fraction:
        cols += ["teacher_steps_frac", "teacher_seconds_frac"]
    return cols


def markdown_report(payload: dict) -> str:
    """The ``.md`` of a run: command, machine, total seconds, then one table per testbed."""
    t = payload["teacher"]
    teacher = (
        "analytic (exact) teacher of each testbed"
        if t is None
        else f"trained teacher `{payload['teacher_workdir']}` ({t['steps']} steps at batch {t['batch']}"
        + (f", {t['wall_seconds']:.0f} s" if t["wall_seconds"] else ", wall seconds unknown")
        + ")"
    )
    lines = [
        f"# Distillation benchmark: {', '.join(payload['recipes'])} on {', '.join(payload['testbeds'])}",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {payload['machine']}. Total: {payload['seconds']:.0f} s "
        f"(written {time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        f"Teacher: {teacher}. Flow-map MSE is against the reference (the teacher's adaptive solve of "
        "the same noise); distances are to the testbed's data, lower is better. Cost: student `steps` "
        "at `batch`, `wall_seconds` of the whole distill call, `teacher_nfe` = total teacher network "
        "evaluations of single examples (mean per example per step x steps x batch, + teacher pairs; "
        "blank when the losses do not report it)"
        + (", `teacher_*_frac` = fraction of the teacher's own training" if t else "")
        + ".",
    ]
    for name, res in payload["testbeds"].items():
        ref, rows = res["reference"], res["rows"]
        dist = [k for k in ("sw2", "mmd") if any(k in r for r in rows)] or sorted(
            {k for r in rows for k in r if k.startswith("fd_")}
        )
        lines += ["", f"## {name}", ""]
        cond = (
            f" Conditional: balanced labels over {ref['num_classes']} classes, CFG scale "
            f"{ref['guidance']:g} (Imagen form); distances per class, averaged over the classes."
            if ref["per_class"]
            else ""
        )
        lines.append(
            f"Reference: `{ref['teacher']}` on the `{ref['path']}` path, adaptive RK45 ({ref['nfe']} NFE, "
            f"MSE {ref['mse_vs_tighter']:.1e} vs a 10x tighter solve), {ref['num_samples']} samples.{cond}"
        )
        lines += ["", markdown_table(rows, table_columns(rows, dist, t is not None))]
        sampled = [r for r in rows if r["method"] not in REFERENCE_METHODS]
        nfes = sorted({r["nfe"] for r in sampled})
        if dist and nfes:
            pivot = pivot_markdown(sampled, dist[0], nfes, index=("method",))
            lines += ["", f"{dist[0]} by NFE:", "", pivot]
    return "\n".join(lines) + "\n"


def _command(argv) -> str:
    return shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", default="gmm8,checker,gmm_hd")
    ap.add_argument("--recipes", default="traflow,cd,ctm")
    ap.add_argument("--steps", type=int, default=None, help="student steps per recipe (default: testbed's)")
    ap.add_argument("--out", default="bench_results/distill.json", help="JSON; the .md goes next to it")
    ap.add_argument("--workdir_root", default=None)
    ap.add_argument("--teacher_workdir", default=None, help="a train_teacher workdir to distil from")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (Imagen form) of the eval")
    ap.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="config override"
    )
    ap.add_argument("--nfes", default=None, help="student NFEs, e.g. 1,2,4,8 (default: the recipe's)")
    ap.add_argument("--gammas", default=None, help="student sampler gammas (default: the recipe's)")
    ap.add_argument("--teacher_solvers", default=",".join(TEACHER_SOLVERS))
    ap.add_argument(
        "--pooled",
        action="store_true",
        help="score conditional samples against the whole data (balanced labels), not per class: "
        "for image testbeds, where a Frechet distance per class would rest on too few samples",
    )
    ap.add_argument(
        "--reference_rtol",
        type=float,
        default=1e-5,
        help="tolerance of the adaptive reference solve (a neural image teacher needs hundreds of NFE "
        "at 1e-5; its table says the reference's own error)",
    )
    a = ap.parse_args(argv)
    return run(
        as_tuple(a.testbeds),
        as_tuple(a.recipes),
        a.steps,
        a.out,
        a.workdir_root,
        teacher_workdir=a.teacher_workdir,
        guidance=a.guidance,
        sets=parse_sets(a.sets),
        nfes=as_tuple(a.nfes, int) if a.nfes else None,
        gammas=as_tuple(a.gammas, float) if a.gammas else None,
        teacher_solvers=as_tuple(a.teacher_solvers),
        command=_command(argv),
        pooled=a.pooled,
        reference_rtol=a.reference_rtol,
    )


if __name__ == "__main__":
    run_cli(main)  # a user error: one line, exit status 2
