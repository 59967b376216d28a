"""Dry run: the scale configs' train steps compile on 8 simulated CPU devices and report memory
and FLOPs; a run that cannot fit exits with an FSDP/batch suggestion that does fit."""

import math

import pytest

from fewstep_jax.modes import dryrun
from fewstep_jax.modes.dryrun import ACCELERATORS, Accelerator, dry_run, load_config_file, sharded_bytes

# small networks of the same layout, so a compile takes seconds (full size: slow tests)
SMALL = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "attention_head_dim": 32}
CIFAR = ["rf_teacher", "vp_teacher", "traflow", "cd", "ctm", "tcd", "lcm", "tdm", "dmd"]
FAST = ("traflow",)  # rf_teacher: compiled once by the assess test below


def _check(report, cfg):
    assert report["simulated_devices"] == 8 and report["num_devices"] == 8
    assert report["per_device_batch"] * 8 == cfg.train.batch_size
    for k in ("argument_bytes", "temp_bytes", "output_bytes", "flops_per_device"):
        assert report[k] > 0, k
    # the donated state comes back in place, and every device holds at least the (replicated) state
    assert report["alias_bytes"] > 0
    assert report["argument_bytes"] >= 4 * report["params"]
    assert report["flops_per_step"] == pytest.approx(8 * report["flops_per_device"])
    # a train step costs at least fwd+bwd of the main network: 2 * params FLOPs per image is a
    # loose floor (convolutions reuse each weight over every pixel)
    assert report["flops_per_device"] > 2 * report["params"] * report["per_device_batch"]
    assert report["step_seconds_at_mfu"] == pytest.approx(
        report["flops_per_device"] / (0.4 * report["peak_flops"])
    )
    assert report["fits"]


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CIFAR])
def test_cifar10_configs_report_memory_and_flops(name):
    cfg = load_config_file(f"configs/cifar10_{name}.py")
    report = dry_run(cfg, model_overrides=SMALL)
    _check(report, cfg)
    if cfg.mode == "distill":
        assert report["teacher_params"] > 0
    text = dryrun.format_report(report)
    assert "GiB" in text and "FLOPs per step" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR)
def test_cifar10_full_size(name):
    cfg = load_config_file(f"configs/cifar10_{name}.py")
    report = dry_run(cfg)
    _check(report, cfg)
    assert report["params"] > 50e6


def test_assess_on_other_accelerators_and_a_measured_step_time_gives_mfu():
    cfg = load_config_file("configs/cifar10_rf_teacher.py")
    measured, state = dryrun.compile_step(cfg, model_overrides=SMALL)
    _check(dryrun.assess(measured, state, cfg), cfg)
    v4 = dryrun.assess(measured, state, cfg, ACCELERATORS["tpu_v4"])
    h100 = dryrun.assess(measured, state, cfg, ACCELERATORS["h100_80gb"])
    for r in (v4, h100):  # the compiled step's numbers do not depend on the accelerator
        assert {k: r[k] for k in measured} == measured
    assert v4["peak_flops"] == ACCELERATORS["tpu_v4"].peak_fp32
    assert v4["step_seconds_at_mfu"] / h100["step_seconds_at_mfu"] == pytest.approx(
        h100["peak_flops"] / v4["peak_flops"]
    )
    cfg.dryrun.step_time = 0.5
    r = dryrun.assess(measured, state, cfg)
    assert r["implied_mfu"] == pytest.approx(r["flops_per_device"] / (0.5 * r["peak_flops"]))
    assert "implies MFU" in dryrun.format_report(r)


def test_does_not_fit_suggests_fsdp_that_fits():
    cfg = load_config_file("configs/cifar10_rf_teacher.py")
    cfg.mesh.min_shard_size = 1024
    cfg.train.batch_size = 16  # 2 per device: the state dominates, so sharding it helps
    small = {**SMALL, "block_out_channels": (64, 64, 64, 64)}
    measured, state = dryrun.compile_step(cfg, model_overrides=small)
    # an accelerator whose budget lies between the fsdp=8 and the replicated footprint
    state_saving = measured["bytes_per_device"] - 0.5 * (measured["params"] * 4 * 4) * (1 - 1 / 8)
    tiny = Accelerator("tiny", 1e12, 1e12, state_saving / 0.9)
    r = dryrun.assess(measured, state, cfg, tiny)
    with pytest.raises(SystemExit) as err:
        dryrun.exit_if_not_fit(r)
    msg = str(err.value)
    assert "does not fit" in msg and "--config.mesh.fsdp=" in msg
    fsdp = r["suggestion"]["fsdp"]
    assert fsdp is not None and fsdp > 1
    assert f"--config.mesh.fsdp={fsdp} --config.mesh.data={8 // fsdp}" in msg
    # the suggestion holds when compiled
    cfg.mesh.fsdp, cfg.mesh.data = fsdp, 8 // fsdp
    assert dry_run(cfg, accelerator=tiny, model_overrides=small)["fits"]


def test_sharded_bytes_splits_large_leaves():
    import jax
    import jax.numpy as jnp

    tree = {
        "big": jax.ShapeDtypeStruct((64, 256), jnp.float32),
        "small": jax.ShapeDtypeStruct((7,), jnp.float32),
    }
    full = 64 * 256 * 4 + 7 * 4
    assert sharded_bytes(tree, 1, 1024) == full
    assert sharded_bytes(tree, 8, 1024) == 64 * 256 * 4 // 8 + 7 * 4
    assert math.isclose(sharded_bytes(tree, 8, 10**9), full)


def test_bad_inputs_are_named():
    cfg = load_config_file("configs/cifar10_traflow.py")
    cfg.dryrun.teacher_config = "configs/nope.py"
    with pytest.raises(FileNotFoundError, match=r"nope\.py"):
        dry_run(cfg, model_overrides=SMALL)
    cfg = load_config_file("configs/cifar10_rf_teacher.py")
    cfg.dryrun.accelerator = "tpu_v99"
    with pytest.raises(ValueError, match="tpu_v99"):
        dry_run(cfg)
    cfg = load_config_file("configs/cifar10_rf_teacher.py")
    cfg.train.batch_size = 100
    with pytest.raises(ValueError, match="batch_size=100"):
        dry_run(cfg)
