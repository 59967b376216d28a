"""The entry point and the two README commands: modes, locked config, CI == README; user errors at
the command lines (fewstep, the dry run, the distillation bench) are one line ``error: ...``."""

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


def blocker(packages) -> str:
    """Python source that makes ``packages`` unimportable (as on a machine without their extra)."""
    return (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(packages)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )


def cli(args, module="fewstep_jax.main", block=(), env=None) -> subprocess.Popen:
    """Starts ``python -m MODULE ARGS`` (with the packages ``block`` unimportable); ``finish`` it."""
    code = blocker(block) + f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    full_env = {k: v for k, v in os.environ.items() if k != "FEWSTEP_VERBOSE"}
    full_env.update(XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(procs, timeout=600) -> list[subprocess.CompletedProcess]:
    """Waits for the processes ``cli`` started (they run side by side)."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


LOG_RECORD = re.compile(r"[IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog")
# `python -m fewstep_jax.modes.dryrun`: the package fewstep_jax.modes imports its dryrun module itself
RUNPY_WARNING = re.compile(
    r"<frozen runpy>:\d+: RuntimeWarning: 'fewstep_jax\.modes\.dryrun' found in sys\.modules"
)


def error_line(r, strict=False) -> str:
    """The one line ``error: ...`` of a command that failed with a user error: exit status 2, no
    traceback, nothing else on stderr but log records (none at all when ``strict``)."""
    noise = [] if strict else [LOG_RECORD, RUNPY_WARNING]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not any(p.match(ln) for p in noise)]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_command_line_mistakes_are_one_line_before_anything_runs(tmp_path):
    """Found while parsing the flags: stderr is exactly the error line (nothing is imported that logs)."""
    wd, default = f"--workdir={tmp_path / 'w'}", "--config=configs/default.py"
    cases = [
        (["--config=configs/distill.py:gmm8,travlow", wd], ["'travlow'", "did you mean 'traflow'?"]),
        (["--config=configs/distill.py:gmm9,traflow", wd], ["'gmm9'", "did you mean 'gmm8'?"]),
        (
            ["--config=configs/distil.py:gmm8,traflow", wd],
            ["'configs/distil.py' not found", "'configs/distill.py'"],
        ),
        (
            [default, wd, "--config.eval.num_sampels=3"],
            ["key 'eval.num_sampels'", "mean 'eval.num_samples'?"],
        ),
        ([default, wd, "--config.evl.num_samples=3"], ["key 'evl.num_samples'", "mean 'eval.num_samples'?"]),
        ([default, wd, "--config.eval.num_samples=abc"], ["--config.eval.num_samples=abc", "int"]),
        ([default, wd, "stray"], ["unexpected arguments ['stray']"]),
    ]
    for (args, expected), r in zip(cases, finish([cli(a) for a, _ in cases]), strict=True):
        line = error_line(r, strict=True)
        assert all(e in line for e in expected), (args, line)
    assert not (tmp_path / "w").exists()  # nothing was written


def test_mistakes_found_by_a_mode_are_one_line(tmp_path):
    missing = tmp_path / "no_run"
    cases = [
        (["--config=configs/gmm8_teacher.py", "--config.mode=distil", f"--workdir={tmp_path / 'a'}"],
         ["unknown mode 'distil'", "did you mean 'distill'?"]),
        (["--config=configs/export.py", f"--workdir={missing}", f"--config.export.out={tmp_path / 'o'}"],
         [str(missing), "does not exist"]),
        (["--config=configs/sample.py", f"--workdir={missing}"], [str(missing), "does not exist"]),
        (["--config=configs/distill.py:gmm8,traflow", f"--workdir={tmp_path / 'b'}",
          f"--config.teacher.workdir={tmp_path / 'no_teacher'}"], [str(tmp_path / "no_teacher")]),
        (["--config=configs/cifar10_rf_teacher.py", f"--workdir={tmp_path / 'c'}"], ['"fewstep-jax[tfds]"']),
    ]  # fmt: skip
    block = {4: ("tensorflow", "tensorflow_datasets")}  # the last case: without the tfds extra
    procs = [cli(a, block=block.get(i, ())) for i, (a, _) in enumerate(cases)]
    for (args, expected), r in zip(cases, finish(procs), strict=True):
        line = error_line(r)
        assert all(e in line for e in expected), (args, line)
    assert not missing.exists()  # a run's reader does not create the workdir it lacks


def test_verbose_shows_the_traceback(tmp_path):
    args = ["--config=configs/distill.py:gmm8,travlow", f"--workdir={tmp_path}"]
    flag, env = finish([cli([*args, "--verbose"]), cli(args, env={"FEWSTEP_VERBOSE": "1"})])
    for r in (flag, env):
        assert r.returncode == 2 and "Traceback" in r.stderr and "UserError" in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: unknown distillation recipe 'travlow'")


def test_dryrun_and_bench_command_lines_report_user_errors_in_one_line(tmp_path):
    dry = "fewstep_jax.modes.dryrun"
    bench = "fewstep_jax.bench.distill"
    out = [f"--out={tmp_path / 'b.json'}", f"--workdir_root={tmp_path / 'runs'}", "--steps=1"]
    cases = [
        (dry, ["--config=configs/cifar10_traflow.py", "--config.dryrun.accelerator=tpu_v44"],
         ["'tpu_v44'", "did you mean 'tpu_v4'?"]),
        (dry, ["--config=configs/cifar10_traflow.py", "--config.dryrun.acelerator=tpu_v4"],
         ["did you mean 'dryrun.accelerator'?"]),
        (bench, ["--testbeds=gmm8", "--recipes=travlow", *out], ["'travlow'", "did you mean 'traflow'?"]),
        (bench, ["--testbeds=gmm8", "--recipes=traflow", "--set=eval.num_sampels=3", *out], ["num_sampels"]),
    ]  # fmt: skip
    for (module, args, expected), r in zip(cases, finish([cli(a, m) for m, a, _ in cases]), strict=True):
        line = error_line(r)
        assert all(e in line for e in expected), (module, args, line)
    assert not (tmp_path / "b.json").exists()


def test_unknown_mode_lists_known_modes():
    from fewstep_jax.errors import UserError
    from fewstep_jax.main import resolve_mode

    with pytest.raises(UserError, match=r"unknown mode 'dance'; known: \['distill'"):
        resolve_mode("dance")
    with pytest.raises(ValueError, match="did you mean 'export'"):  # a UserError is a ValueError
        resolve_mode("exprot")


def test_did_you_mean_and_missing_packages():
    from fewstep_jax.errors import MissingPackageError, did_you_mean, require

    assert did_you_mean("travlow", ["traflow", "tcd"]) == " (did you mean 'traflow'?)"
    assert did_you_mean("zzz", ["traflow", "tcd"]) == ""
    with pytest.raises(MissingPackageError, match=re.escape('pip install "fewstep-jax[torch]"')) as e:
        require("diffusers.no_such_module_xyz", "the test")
    assert isinstance(e.value, ImportError) and "the test needs diffusers" in str(e.value)
    with pytest.raises(ModuleNotFoundError):  # not an extra's package: an ordinary import error
        require("no_such_package_xyz", "the test")


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
        "from fewstep_jax.modes import MODES; from tests.test_main import probe_devices;"
        "os.cpu_count = lambda: 2; MODES['probe'] = probe_devices;"
        "sys.argv = sys.argv[1:]; app.run(m.main, flags_parser=m.parse_flags_or_exit)"
    )
    args = ["x", "--config=configs/gmm8_teacher.py", "--config.mode=probe", f"--workdir={tmp_path}", flag]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "devices.txt").read_text() == expected
