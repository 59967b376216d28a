"""Mesh, shardings and multi-process training: sharded runs give the numbers of unsharded ones."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from fewstep_jax import parallel

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from tiny_model import batch, init_state, train_step

REPO = Path(__file__).resolve().parents[1]
STEPS, MIN_SIZE = 5, 256


def _train(data: int | None, fsdp: int = 1) -> tuple[np.ndarray, dict, dict]:
    """Losses, final params and final param shardings of STEPS steps (data=None: one device)."""
    state = init_state(0)
    if data is None:
        dev = jax.devices()[0]
        state = jax.device_put(state, dev)
        step = jax.jit(train_step, donate_argnums=0)
        put = lambda b: jax.device_put(b, dev)
    else:
        mesh = parallel.make_mesh(data, fsdp)
        state_sh = parallel.param_sharding(state, mesh, min_size=MIN_SIZE)
        state = parallel.shard_tree(state, state_sh)
        step = jax.jit(
            train_step,
            in_shardings=(state_sh, parallel.batch_sharding(mesh)),
            out_shardings=(state_sh, parallel.replicated(mesh)),
            donate_argnums=0,
        )
        put = lambda b: parallel.global_batch(b, mesh)
    losses = []
    for i in range(STEPS):
        state, loss = step(state, put(batch(0, i)))
        losses.append(float(loss))
    params = jax.tree.map(np.asarray, state["params"])
    shardings = {k: v.sharding for k, v in state["params"].items()}
    return np.array(losses), params, shardings


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, dict, dict]:
    return _train(None)


def _assert_same(a: tuple, b: tuple) -> None:
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_reference_run_learns(reference):
    assert reference[0][-1] < reference[0][0]


def test_data_parallel_matches_one_device(reference):
    run = _train(8, 1)
    _assert_same(run, reference)
    assert all(s.is_fully_replicated for s in run[2].values())


def test_fsdp_matches_one_device_and_shards_params(reference):
    run = _train(2, 4)
    _assert_same(run, reference)
    sharded = {k for k, s in run[2].items() if not s.is_fully_replicated}
    # w0 (4, 64) and w1 (64, 64) reach MIN_SIZE; biases and w2 (64, 1) stay replicated.
    assert sharded == {"w0", "w1"}
    assert run[2]["w1"].spec == PartitionSpec(None, "fsdp")


def test_make_mesh_shapes_and_axis_types():
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert dict(parallel.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize(
    ("data", "fsdp", "match"),
    [
        (3, 1, "data=3 x fsdp=1 = 3 devices, but there are 8"),
        (-1, 3, "3 does not divide the 8"),
        (2, 2, "= 4 devices, but there are 8"),
        (0, 1, "data=0"),
    ],
)
def test_make_mesh_rejects_bad_shapes(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(data, fsdp)


def test_param_sharding_rules():
    tree = {
        "big": jax.ShapeDtypeStruct((6, 512, 8), np.float32),  # largest dim divisible by 4: 512
        "odd": np.zeros((129, 129), np.float32),  # big but no dim divides by 4
        "small": np.zeros((4, 4), np.float32),
        "step": np.zeros((), np.int32),
    }
    specs = {k: s.spec for k, s in parallel.param_sharding(tree, parallel.make_mesh(2, 4)).items()}
    assert specs == {
        "big": PartitionSpec(None, "fsdp", None),
        "odd": PartitionSpec(),
        "small": PartitionSpec(),
        "step": PartitionSpec(),
    }
    replicated = parallel.param_sharding(tree, parallel.make_mesh(8, 1))
    assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated))


def test_global_batch_shards_rows_and_validates():
    mesh = parallel.make_mesh(2, 4)
    out = parallel.global_batch(batch(0, 0), mesh)
    assert out["x"].shape == (32, 4)
    assert out["x"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert {s.data.shape for s in out["x"].addressable_shards} == {(4, 4)}
    np.testing.assert_array_equal(np.asarray(out["y"]), batch(0, 0)["y"])
    with pytest.raises(ValueError, match=r"global batch 12 .* 8 devices"):
        parallel.global_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="leading"):
        parallel.global_batch({"x": np.zeros((8, 2)), "y": np.zeros((16,))}, mesh)
    # a text conditioning: the nested dict's arrays split by rows like the rest
    states = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
    nested = parallel.global_batch({"x": np.zeros((8, 2)), "label": {"text_states": states}}, mesh)
    assert nested["label"]["text_states"].sharding.spec == PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(nested["label"]["text_states"]), states)
    with pytest.raises(ValueError, match="leading.*text_mask"):
        parallel.global_batch({"x": np.zeros((8, 2)), "label": {"text_mask": np.zeros((4, 3))}}, mesh)


def test_initialize_distributed_is_a_noop_without_settings(monkeypatch):
    for k in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(ValueError, match="num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_two_processes_match_single_process(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives) == 8 devices in one process."""
    out = tmp_path / "out.npz"
    cmd = [
        sys.executable, str(REPO / "launch" / "multiprocess.py"),
        "--num_processes", "2", "--devices_per_process", "4", "--timeout", "150", "--",
        sys.executable, str(REPO / "tests" / "workers" / "multiproc_train.py"),
        str(out), str(STEPS), "2", "4", str(MIN_SIZE),
    ]  # fmt: skip
    # Own session, so that on a hang the launcher and both workers die together.
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.decode()[-3000:]
    got = np.load(out)
    assert sorted(got["sharded"]) == ["w0", "w1"]
    want_losses, want_params, _ = _train(2, 4)
    np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
    for k, v in want_params.items():
        np.testing.assert_allclose(got[f"p_{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)
