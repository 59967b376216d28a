"""The accelerator benchmark (bench/accelerator.py): device mapping, input errors before any work,
and (slow) its whole CPU path on the tiny budget from an MNIST-format file the test writes."""

import json

import numpy as np
import pytest

from fewstep_jax.bench import accelerator
from fewstep_jax.modes.dryrun import ACCELERATORS


@pytest.mark.parametrize(
    "kind,name",
    [
        ("NVIDIA H100 80GB HBM3", "h100_80gb"),
        ("NVIDIA H200", "h200_141gb"),
        ("NVIDIA A100-SXM4-80GB", "a100_80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
        ("TPU v5 lite", "tpu_v5e"),
        ("TPU v5", "tpu_v5p"),
        ("TPU v4", "tpu_v4"),
        ("cpu", None),
    ],
)
def test_device_kind_maps_to_its_peak(kind, name):
    acc = accelerator.accelerator_for(kind)
    assert (acc and acc.name) == name
    if name == "h200_141gb":  # the H100 SXM's compute with the H200's memory
        assert acc.hbm_bytes == 141e9 and acc.peak_bf16 == ACCELERATORS["h100_80gb"].peak_bf16


def test_bad_inputs_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such\.npz"):
        accelerator.run(str(tmp_path / "no_such.npz"), str(tmp_path / "out"), "tiny")
    with pytest.raises(ValueError, match="--budget='huge'"):
        accelerator.run(str(tmp_path / "x.npz"), str(tmp_path / "out"), "huge")
    assert not (tmp_path / "out").exists()


def _fake_mnist(path, n=600, seed=0):
    """MNIST's format (uint8 28x28, labels 0-9): class-dependent blobs, enough to train on."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    yy, xx = np.mgrid[:28, :28]
    cx, cy = 6 + 1.6 * y, 14 + 6 * np.sin(y)
    blob = np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 18.0)
    x = np.clip(255 * blob + rng.normal(0, 20, blob.shape), 0, 255).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])


@pytest.mark.slow
def test_tiny_budget_runs_every_part(tmp_path):
    """About 4 minutes on 2 CPU cores: the teacher, the three students and the step timing."""
    _fake_mnist(tmp_path / "mnist.npz")
    p = accelerator.run(str(tmp_path / "mnist.npz"), str(tmp_path / "out"), "tiny", command="test")
    saved = json.loads((tmp_path / "out" / "accelerator.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(p["rows"]))
    methods = {r["method"] for r in p["rows"]}
    assert set(accelerator.RECIPES) <= methods and "teacher (converged)" in methods
    assert {r["nfe"] for r in p["rows"] if r["method"] == "traflow"} == set(accelerator.NFES)
    assert p["teacher"]["steps"] == accelerator.BUDGETS["tiny"].teacher_steps
    assert p["timing"]["steps_per_s"] > 0 and p["timing"]["flops_per_step"] > 0
    assert p["timing"]["mfu"] is None  # a CPU has no peak in the table
    text = (tmp_path / "out" / "accelerator.md").read_text()
    assert "Command: `test`" in text and "not results" in text and "## 3. Train-step speed" in text
