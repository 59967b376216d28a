"""Mode ``pipeline`` (the default run) on a tiny budget: report.md with every method's rows at NFE
1/2/4 beside the teacher's, the PNGs, progress per stage; a rerun skips the stages already done
and an interrupted stage resumes from its checkpoint."""

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from fewstep_jax.main import resolve_mode
from fewstep_jax.modes import pipeline
from fewstep_jax.modes.dryrun import load_config_file
from fewstep_jax.recipes import RECIPES
from fewstep_jax.runs import writers

STEPS = 6


def tiny_config():
    c = load_config_file("configs/default.py")
    c.pipeline.steps = STEPS
    c.pipeline.batch_size = 32
    c.pipeline.trajectory_samples = 20
    c.pipeline.teacher_solvers = ("euler",)  # one solver: fewer compilations
    c.eval.num_samples = 100
    c.eval.batch_size = 100
    c.testbed.num_reference = 300
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.async_checkpoints = False
    return c


def run(workdir: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        resolve_mode("pipeline")(tiny_config(), str(workdir))
    return out.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("pipeline")
    return workdir, run(workdir)


def table_rows(workdir: Path) -> list[list[str]]:
    text = (workdir / "report.md").read_text()
    all_rows = text[text.index("| method | path | nfe |") :]
    lines = [line for line in all_rows.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_default_config_is_the_pipeline_of_every_existing_method():
    c = load_config_file("configs/default.py")
    assert c.mode == "pipeline" and c.testbed.name == "gmm8" and not c.teacher.workdir
    methods, skipped = pipeline.available_methods(c)
    assert methods == tuple(m for m in ("traflow", "tcd", "tdm") if m in RECIPES)
    assert set(skipped) == {"traflow", "tcd", "tdm"} - set(RECIPES)


def test_report_has_every_method_at_nfe_1_2_4_beside_the_teacher(first):
    workdir, out = first
    methods, _ = pipeline.available_methods(tiny_config())
    rows = table_rows(workdir)
    cells = {(r[0], r[2]) for r in rows[2:]}
    for m in methods:
        for nfe in ("1", "2", "4"):
            assert (m, nfe) in cells, (m, nfe)
    paths = {r[1] for r in rows[2:]}
    for path in paths:
        assert any(name == f"teacher (converged) [{path}]" for name, _ in cells)
        for nfe in ("1", "2", "4"):
            assert (f"teacher euler [{path}]", nfe) in cells
    payload = json.loads((workdir / "pipeline.json").read_text())
    assert payload["methods"] == list(methods)
    assert len(payload["rows"]) == len(rows) - 2
    for name in ("samples.png", "trajectories.png", "loss_curves.png"):
        assert (workdir / name).stat().st_size > 5000, name
    # progress: a header and the loop's step lines, prefixed with the stage
    total = len(paths) + len(methods)
    for k, m in enumerate(methods, start=len(paths) + 1):
        assert f"[{k}/{total}] {m}: {STEPS} steps" in out
        assert f"[{k}/{total}] {m}: step {STEPS}/{STEPS}" in out


def test_rerun_skips_every_stage_done(first):
    workdir, _ = first
    methods, _ = pipeline.available_methods(tiny_config())
    before = {m: len(writers.read_metrics(workdir / m)) for m in methods}
    out = run(workdir)
    assert "starting at step" not in out and "resumed at step" not in out
    assert out.count("skipped") >= len(methods) + 1
    assert {m: len(writers.read_metrics(workdir / m)) for m in methods} == before
    assert (workdir / "report.md").exists()


def test_interrupted_stage_resumes_from_its_checkpoint(first):
    workdir, _ = first
    m = pipeline.available_methods(tiny_config())[0][0]
    ckpts = workdir / m / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps[-1] == STEPS and len(steps) >= 2
    # as if killed after the second-to-last checkpoint, before the stage finished
    shutil.rmtree(ckpts / str(STEPS))
    os.remove(workdir / m / "stage.json")
    out = run(workdir)
    resumed = re.findall(rf"\] {m}: resumed at step (\d+) of {STEPS}", out)
    assert resumed == [str(steps[-2])], out[-2000:]
    assert "starting at step 0" not in out
    assert (workdir / m / "stage.json").exists() and (ckpts / str(STEPS)).exists()
