"""`python -m fewstep_jax.main` trains a teacher: checkpoints, TensorBoard events, metrics.jsonl,
report; a rerun resumes; (slow) a SIGKILLed run resumes to the uninterrupted params and 2
processes x 4 devices match 1 process x 8 devices."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fewstep_jax.runs import writers
from fewstep_jax.teachers.neural import latest_checkpoint, restore_state_tree

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = [
    "--config=configs/gmm8_teacher.py",
    "--config.model.width=32",
    "--config.model.num_layers=1",
    "--config.model.emb_dim=16",
    f"--config.train.num_steps={STEPS}",
    "--config.train.batch_size=64",
    "--config.train.log_every=2",
    "--config.train.checkpoint_every=2",
    "--config.testbed.num_reference=500",
    "--config.eval.train_nfes=2",
    "--config.eval.train_solvers=euler",
    "--config.eval.train_num_samples=100",
]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _main(workdir: Path, *extra: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fewstep_jax.main", *TINY, f"--workdir={workdir}", *extra],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _final_params(workdir: Path) -> dict:
    return restore_state_tree(latest_checkpoint(workdir))


def _assert_trees_close(a, b, **tol) -> None:
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, 1 process x 8 simulated devices."""
    workdir = tmp_path_factory.mktemp("ref")
    out = _main(workdir)
    assert f"starting at step 0 of {STEPS}" in out
    return workdir


def test_run_writes_checkpoints_events_metrics_report(reference):
    assert latest_checkpoint(reference).name == str(STEPS)
    assert list(reference.glob("events.out.tfevents.*"))
    rows = writers.read_metrics(reference)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(2, STEPS + 1, 2))
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("eval/euler_nfe2/sw2" in r for r in rows)
    report = (reference / "report.md").read_text()
    assert "loss/flow_matching" in report and "euler_nfe2/sw2" in report
    assert (reference / "loss_curve.png").stat().st_size > 1000
    assert (reference / "config.json").is_file() and (reference / "teacher_eval.json").is_file()


def test_rerun_resumes_instead_of_restarting(reference):
    before = len(writers.read_metrics(reference))
    out = _main(reference)
    assert f"resumed at step {STEPS} of {STEPS}" in out
    rows = writers.read_metrics(reference)
    # no training rows were appended (only the final evaluation row)
    assert [r for r in rows[before:] if "loss" in r] == []


# slow: tests/test_checkpoints.py SIGKILLs (and SIGTERMs) a real training worker mid-run in the
# default suite and checks the resumed params; this one is the same through the whole main loop.
@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_params(reference, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "tests" / "workers" / "slow_train_teacher.py"),
        "0.5",
        "--",
        *TINY,
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line == "batch 5":
                break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = int(latest_checkpoint(tmp_path).name)
    assert 2 <= done < STEPS
    out = _main(tmp_path)
    assert f"resumed at step {done} of {STEPS}" in out
    _assert_trees_close(_final_params(tmp_path), _final_params(reference), rtol=0, atol=0)


# slow: tests/test_parallel.py runs 2 real processes x 4 devices against 1 x 8 in the default
# suite (the sharded train step); this one is the whole main loop (data, eval, checkpoints) too.
@pytest.mark.slow
def test_two_processes_match_one_process(reference, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "launch" / "multiprocess.py"),
        "--num_processes",
        "2",
        "--devices_per_process",
        "4",
        "--timeout",
        "400",
        "--",
        sys.executable,
        "-m",
        "fewstep_jax.main",
        *TINY,
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=450)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.decode()[-3000:]
    _assert_trees_close(_final_params(tmp_path), _final_params(reference), rtol=1e-5, atol=1e-6)
    ref_rows = [r for r in writers.read_metrics(reference) if "loss" in r]
    rows = [r for r in writers.read_metrics(tmp_path) if "loss" in r]
    np.testing.assert_allclose(
        [r["loss"] for r in rows], [r["loss"] for r in ref_rows[: len(rows)]], rtol=1e-5
    )
