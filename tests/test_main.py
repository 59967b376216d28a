"""The entry point and the two README commands: modes, locked config, CI == README."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "fewstep_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_evaluate_mode_writes_the_solver_table(tmp_path):
    r = _run(
        [
            "--config=configs/gmm8_solvers.py",
            f"--workdir={tmp_path}",
            "--config.eval.nfes=1,8",
            "--config.eval.solvers=euler,heun",
            "--config.eval.num_samples=300",
            "--config.testbed.num_reference=1000",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "solvers.json").read_text())
    rows = {(row["method"], row["nfe"]): row for row in res["rows"]}
    assert ("euler", 1) in rows and ("heun", 8) in rows and ("heun", 1) not in rows
    # more steps, smaller flow-map error; the converged teacher is the reference itself
    assert rows[("euler", 8)]["flow_map_mse"] < 0.1 * rows[("euler", 1)]["flow_map_mse"]
    assert rows[("teacher (converged)", res["reference"]["nfe"])]["flow_map_mse"] == 0.0
    assert res["reference"]["mse_vs_tighter"] < 1e-6
    assert "| gmm8 | euler | 1 |" in (tmp_path / "solvers.md").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["testbed"]["name"] == "gmm8"


def test_unknown_config_key_is_named(tmp_path):
    r = _run(["--config=configs/default.py", f"--workdir={tmp_path}", "--config.eval.num_sampels=3"])
    assert r.returncode != 0
    assert "num_sampels" in r.stderr and "unknown config key" in r.stderr


def test_unknown_mode_lists_known_modes():
    from fewstep_jax.main import resolve_mode

    with pytest.raises(ValueError, match="known modes"):
        resolve_mode("dance")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = Path(ROOT, ".ci", "run").read_text().strip().splitlines()[-1]
    readme = Path(ROOT, "README.md").read_text()
    assert ci.startswith("python3 -m venv .venv") and "pytest" in ci
    assert ci in readme, f"README must contain the CI command verbatim: {ci}"
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    assert "fewstep" in first and "configs/default.py" in first


def test_cpu_device_count_auto_is_a_power_of_two_and_respects_xla_flags():
    from fewstep_jax.main import cpu_device_count

    assert cpu_device_count(0, 2, "") == 2
    assert cpu_device_count(0, 6, "") == 4  # batch sizes stay divisible
    assert cpu_device_count(0, 64, "") == 8
    assert cpu_device_count(0, None, "") == 1
    assert cpu_device_count(3, 2, "") == 3  # an explicit request wins
    assert cpu_device_count(0, 2, "--xla_force_host_platform_device_count=8") is None
    with pytest.raises(ValueError, match="cpu_devices=-1"):
        cpu_device_count(-1, 2, "")


def probe_devices(config, workdir):
    """A mode for the test below: records how many devices the run saw."""
    import jax

    Path(workdir, "devices.txt").write_text(str(jax.device_count()))


@pytest.mark.parametrize("flag,expected", [("--cpu_devices=3", "3"), ("--cpu_devices=0", "2")])
def test_cpu_devices_flag_splits_the_host_cpu(tmp_path, flag, expected):
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import os, sys; from absl import app; from fewstep_jax import main as m;"
        "os.cpu_count = lambda: 2;"
        "m.MODES['probe'] = 'tests.test_main:probe_devices';"
        "sys.argv = sys.argv[1:]; app.run(m.main, flags_parser=m.parse_flags_or_exit)"
    )
    args = ["x", "--config=configs/gmm8_teacher.py", "--config.mode=probe", f"--workdir={tmp_path}", flag]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "devices.txt").read_text() == expected
