"""A real (non-editable) install, used from outside the repository: the default job, a distillation
recipe by name and the bench harness run from the installed copy, with configs read by path.

The install goes into a fresh venv that sees this interpreter's packages (a .pth naming its
site-packages: jax, flax, ... are not reinstalled) from a copy of the sources, so the checkout
gets no build/ or egg-info; `pip install --no-deps --no-build-isolation` takes a few seconds.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fewstep_jax.runs import writers

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    # 2 XLA:CPU devices (main's auto), and nothing that would put the checkout on sys.path.
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return env


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _purelib(env: Path) -> Path:
    """site-packages of the venv `env`."""
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding fewstep-jax installed (not editable) from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fewstep_jax", src / "fewstep_jax", ignore=shutil.ignore_patterns("__pycache__"))
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    # Plain path lines: the parent's own .pth files (its editable finder of the checkout) stay unread.
    (_purelib(env) / "parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
         str(src)],
        cwd=tmp,
    )  # fmt: skip
    return env


@pytest.fixture()
def run_installed(venv, tmp_path):
    """Runs the venv's `fewstep` (or `python` for a list starting with "-m") from tmp_path."""

    def run(args: list[str]) -> subprocess.CompletedProcess:
        exe = venv / "bin" / ("python" if args[0] == "-m" else "fewstep")
        return _run([str(exe), *args], cwd=tmp_path)

    return run


def test_the_install_is_a_copy_not_the_checkout(venv, tmp_path):
    probe = "import fewstep_jax, fewstep_jax.modes.pipeline as m; print(fewstep_jax.__file__, m.__file__)"
    where = _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path).stdout.split()
    assert all(p.startswith(str(_purelib(venv))) for p in where), where
    assert (Path(where[0]).parent / "assets" / "mnist_classifier.npz").is_file()  # package data


def test_default_job_runs_from_outside_the_repo(run_installed, tmp_path):
    """The README's first command on a short budget: one method, few steps and samples."""
    workdir = tmp_path / "default"
    run_installed([
        f"--config={ROOT}/configs/default.py", f"--workdir={workdir}", "--config.pipeline.steps=20",
        "--config.pipeline.methods=('traflow',)", "--config.eval.num_samples=200",
        "--config.pipeline.trajectory_samples=20", "--config.pipeline.teacher_solvers=('euler',)",
    ])  # fmt: skip
    assert json.loads((workdir / "pipeline.json").read_text())["methods"] == ["traflow"]
    assert (workdir / "report.md").is_file()


def test_recipe_by_name_runs_from_outside_the_repo(run_installed, tmp_path):
    workdir = tmp_path / "distill"
    run_installed([
        f"--config={ROOT}/configs/distill.py:gmm8,traflow", f"--workdir={workdir}",
        "--config.train.num_steps=10", "--config.eval.num_samples=200",
        "--config.eval.nfes=(1,)", "--config.eval.teacher_solvers=('euler',)",
    ])  # fmt: skip
    assert [r["step"] for r in writers.read_metrics(workdir) if "loss" in r][-1] == 10


def test_bench_harness_runs_from_outside_the_repo(run_installed, tmp_path):
    out = tmp_path / "bench" / "distill.json"
    run_installed([
        "-m", "fewstep_jax.bench.distill", "--testbeds=gmm8", "--recipes=traflow", "--steps=10",
        f"--out={out}", "--set=eval.num_samples=200", "--set=eval.nfes=(1,)",
        "--set=eval.teacher_solvers=('euler',)", f"--workdir_root={tmp_path / 'runs'}",
    ])  # fmt: skip
    rows = json.loads(out.read_text())["testbeds"]["gmm8"]["rows"]
    assert {r["steps"] for r in rows if r["method"] == "traflow"} == {10}, rows
    assert out.with_suffix(".md").is_file()
