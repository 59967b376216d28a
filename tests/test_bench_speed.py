"""Smoke test of the train-step speed benchmark (no timing is asserted)."""

import json

import pytest

from fewstep_jax.bench import train_speed


def test_quick_run_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench" / "speed.json"
    train_speed.main(
        [
            f"--out={out}",
            "--quick",
            "--models=mlp",
            "--mlp_batch_sizes=8",
            "--variants=jax,jax_2dev,torch_eager",
            "--steps=1",
            "--warmup=0",
            "--repeats=1",
        ]
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["jax", "jax_2dev", "torch_eager"]
    for r in rows:
        assert "error" not in r, r
        for field in (*train_speed.FIELDS, "ratio_vs_torch_eager"):
            assert r[field] is not None, (r["variant"], field)
        assert r["model"] == "mlp" and r["batch_size"] == 8
        assert r["steps_per_s"] > 0 and r["examples_per_s"] == pytest.approx(8 * r["steps_per_s"])
    by_name = {r["variant"]: r for r in rows}
    # The 2-device variant really ran on 2 host devices (its own XLA_FLAGS, not conftest's 8).
    assert by_name["jax_2dev"]["devices"] == 2 and by_name["jax"]["devices"] == 1
    assert "--xla_force_host_platform_device_count=2" in by_name["jax_2dev"]["xla_flags"]
    assert by_name["torch_eager"]["ratio_vs_torch_eager"] == pytest.approx(1.0)
    # Same architecture on both sides.
    assert by_name["jax"]["params"] == by_name["torch_eager"]["params"]
    table = capsys.readouterr().out
    assert "| mlp | 8 | jax_2dev |" in table


def test_variant_env_replaces_device_count():
    env = train_speed.variant_env(
        train_speed.VARIANTS["jax_no_eigen_mt"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"},
    )
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=1" in flags
    assert "--xla_force_host_platform_device_count=8" not in flags
    assert "--xla_cpu_multi_thread_eigen=false" in flags and "--xla_dump_to=/tmp/x" in flags


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'jax_fast'"):
        train_speed.main([f"--out={tmp_path}/x.json", "--variants=jax_fast"])
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        train_speed.main([f"--out={tmp_path}/x.json", "--models=resnet"])
    with pytest.raises(ValueError, match="mlp_batch_sizes"):
        train_speed.main([f"--out={tmp_path}/x.json", "--mlp_batch_sizes=0"])
