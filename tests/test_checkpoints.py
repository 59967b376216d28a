"""Checkpointer: round trips, pruning, corrupt-latest fallback, mismatch errors, preemption,
and a worker that is SIGKILLed / SIGTERMed mid-run and still ends with the uninterrupted params."""

import asyncio
import contextlib
import gc
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fewstep_jax import parallel
from fewstep_jax.runs import checkpoints
from fewstep_jax.runs.checkpoints import Checkpointer, CheckpointMismatchError

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from tiny_model import batch, init_state, train_step

REPO = Path(__file__).resolve().parents[1]


def _state(offset: float = 0.0) -> dict:
    """Nested state with float params, optax adam state, a uint32 key and an int32 step."""
    s = init_state(0)
    s["params"] = jax.tree.map(lambda x: x + offset, s["params"])
    s["step"] = s["step"] + int(offset)
    return s


def _abstract(state: dict, mesh=None) -> dict:
    """ShapeDtypeStructs carrying shardings (FSDP over a 2x4 mesh by default)."""
    mesh = mesh or parallel.make_mesh(2, 4)
    shardings = parallel.param_sharding(state, mesh, min_size=256)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _assert_tree_equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _save_steps(ckpt: Checkpointer, steps) -> None:
    for s in steps:
        assert ckpt.save(s, _state(s), {"next_step": s, "config": "tiny"}, force=True)
    ckpt.wait()


def test_round_trip_restores_values_dtypes_and_shardings(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=3, async_save=False)
    state = _state(1.0)
    assert ckpt.save(7, state, {"next_step": 7, "config": "tiny"})
    abstract = _abstract(state)
    restored, meta, step = Checkpointer(tmp_path / "checkpoints", 1, 3).restore_latest(abstract)
    assert (step, meta) == (7, {"next_step": 7, "config": "tiny"})
    _assert_tree_equal(restored, state)
    assert restored["rng"].dtype == np.uint32 and restored["step"].dtype == np.int32
    assert restored["params"]["w1"].sharding.spec == PartitionSpec(None, "fsdp")
    assert restored["params"]["w1"].sharding == abstract["params"]["w1"].sharding
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(tmp_path / "ck", 1, 1).restore_latest(_abstract(_state())) is None


def test_save_interval_and_keep_last_k(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=2, keep=2)
    saved = [ckpt.save(s, _state(s), {"next_step": s}) for s in range(1, 8)]
    ckpt.wait()
    # The first save always happens; then every 2nd step.
    assert saved == [True, True, False, True, False, True, False]
    assert ckpt.all_steps() == [4, 6]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["4", "6"]
    assert ckpt.save(6, _state(6), {}, force=True) is False  # already saved: a no-op
    ckpt.close()


def test_async_save_then_restore(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, keep=2, async_save=True)
    ckpt.save(1, _state(1), {"next_step": 1})
    ckpt.save(2, _state(2), {"next_step": 2})
    # restore_latest waits for the in-flight save itself.
    state, meta, step = ckpt.restore_latest(_abstract(_state()))
    assert (step, meta) == (2, {"next_step": 2})
    _assert_tree_equal(state, _state(2))
    ckpt.close()


def _truncate_data(d: Path) -> None:
    for f in (d / "state").rglob("d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(7)


def _delete_data(d: Path) -> None:
    for f in (d / "state").rglob("d/*"):
        f.unlink()


def _garbage_metadata(d: Path) -> None:
    (d / "state" / "_METADATA").write_text("{not json")


def _no_commit_marker(d: Path) -> None:
    (d / checkpoints.COMMIT_MARKER).unlink()


@contextlib.contextmanager
def _no_tracebacks(capfd, monkeypatch):
    """Fails if the block (or a callback it leaves behind, given 0.3 s to fire) writes a traceback
    to stderr or raises an unraisable exception, e.g. tensorstore posting to a closed asyncio loop."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"Traceback: {u.exc_value!r}"))
    capfd.readouterr()
    yield
    time.sleep(0.3)
    gc.collect()
    err = capfd.readouterr().err + "".join(unraisable)
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


@pytest.mark.parametrize("corrupt", [_truncate_data, _delete_data, _garbage_metadata, _no_commit_marker])
def test_corrupt_latest_falls_back_and_is_set_aside(tmp_path, caplog, capfd, monkeypatch, corrupt):
    root = tmp_path / "ck"
    _save_steps(Checkpointer(root, 1, keep=2), [1, 2])
    corrupt(root / "2")
    ckpt = Checkpointer(root, 1, keep=2)
    with caplog.at_level(logging.ERROR), _no_tracebacks(capfd, monkeypatch):
        state, meta, step = ckpt.restore_latest(_abstract(_state()))
    assert (step, meta["next_step"]) == (1, 1)
    _assert_tree_equal(state, _state(1))
    assert any("step 2" in r.getMessage() and str(root) in r.getMessage() for r in caplog.records)
    assert (root / "2.corrupt" / "state").is_dir() and not (root / "2").exists()
    # Later saves prune only good checkpoints; the bad one stays aside.
    _save_steps(ckpt, [2, 3])
    assert ckpt.all_steps() == [2, 3]
    assert (root / "2.corrupt").is_dir()
    ckpt.close()


def test_all_corrupt_gives_none_and_keeps_files(tmp_path, capfd, monkeypatch):
    root = tmp_path / "ck"
    _save_steps(Checkpointer(root, 1, keep=2), [1, 2])
    _delete_data(root / "1")
    _delete_data(root / "2")
    ckpt = Checkpointer(root, 1, keep=2)
    with _no_tracebacks(capfd, monkeypatch):
        assert ckpt.restore_latest(_abstract(_state())) is None
    assert sorted(p.name for p in root.iterdir() if "corrupt" in p.name) == [
        "1.corrupt",
        "2.corrupt",
    ]
    assert ckpt.all_steps() == []


def _failed_restore_with_a_read_in_flight(finish_pending: bool) -> list[BaseException]:
    """What orbax does when one read of a restore fails (asyncio_utils.run_sync): a fresh loop runs
    a gather of reads to the first failure, then is closed; a sibling read, completed later from
    another thread as tensorstore's are, posts its result to the loop. Returns what that post
    raised."""
    raised: list[BaseException] = []

    async def fails():
        raise OSError("truncated file")

    async def read(fut):
        return await fut

    async def restore(loop):
        fut = loop.create_future()

        def complete_later():
            time.sleep(0.2)
            try:
                loop.call_soon_threadsafe(fut.set_result, "data")
            except RuntimeError as e:
                raised.append(e)

        threading.Thread(target=complete_later).start()
        await asyncio.gather(fails(), read(fut))

    with checkpoints._loops_finish_pending_tasks() if finish_pending else contextlib.nullcontext():
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(OSError, match="truncated"):
                loop.run_until_complete(restore(loop))
        finally:
            loop.close()
    time.sleep(0.4)
    return raised


def test_a_failed_restore_closes_its_loop_only_after_the_reads_in_flight():
    assert "Event loop is closed" in str(_failed_restore_with_a_read_in_flight(False))  # the cause
    assert _failed_restore_with_a_read_in_flight(True) == []


def test_shape_or_key_mismatch_is_a_clear_error_not_corruption(tmp_path):
    root = tmp_path / "ck"
    _save_steps(Checkpointer(root, 1, keep=2), [1])
    ckpt = Checkpointer(root, 1, keep=2)
    abstract = _abstract(_state())
    abstract["params"]["w1"] = jax.ShapeDtypeStruct((64, 32), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"params/w1: checkpoint .*\(64, 64\)"):
        ckpt.restore_latest(abstract)
    abstract = _abstract(_state())
    abstract["ema"] = abstract["params"]
    with pytest.raises(ValueError, match=r"missing in the checkpoint.*ema/w0"):
        ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == [1] and not list(root.glob("*.corrupt*"))


@pytest.fixture
def sigterm_restored():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)
    checkpoints._PREEMPTED.clear()


def test_sigterm_sets_preempted_flag(tmp_path, sigterm_restored):
    ckpt = Checkpointer(tmp_path / "ck", 1, 1)
    checkpoints.install_preemption_handler()
    assert not checkpoints.preempted() and not ckpt.reached_preemption(0)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not checkpoints.preempted() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpoints.preempted() and ckpt.reached_preemption(1)
    ckpt.close()


class _Worker:
    """tests/workers/ckpt_train.py in its own session, with its stdout lines in a queue."""

    def __init__(self, workdir: Path, steps: int):
        script = REPO / "tests" / "workers" / "ckpt_train.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(workdir), str(steps), "3", "0.3"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def read_until(self, prefix: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"worker did not print {prefix!r} in {timeout} s") from None
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(tmp_path):
    steps = 12
    state = init_state(0)
    step_fn = jax.jit(train_step)
    for i in range(steps):
        state, _ = step_fn(state, batch(0, i))
    want = jax.tree.map(np.asarray, state["params"])

    w = _Worker(tmp_path, steps)
    try:
        assert w.read_until("fresh") == "fresh"
        w.read_until("step 5")
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
    finally:
        w.kill()
    w = _Worker(tmp_path, steps)
    try:
        resumed = int(w.read_until("resumed").split()[1])
        assert 1 <= resumed <= 5
        w.read_until("step 8")
        w.proc.send_signal(signal.SIGTERM)
        preempted_at = int(w.read_until("preempted").split()[1])
        assert w.proc.wait(timeout=60) == 0
    finally:
        w.kill()
    assert preempted_at >= 8
    w = _Worker(tmp_path, steps)
    try:
        assert w.read_until("resumed") == f"resumed {preempted_at}"
        assert w.proc.wait(timeout=90) == 0
    finally:
        w.kill()
    got = np.load(tmp_path / "final.npz")
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
