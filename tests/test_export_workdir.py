"""Export of a trained workdir (mode ``export``): loads in plain PyTorch, samples like JAX, errors."""

import json
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fewstep_jax import samplers  # noqa: E402
from fewstep_jax.export import torch_models, torch_sampler  # noqa: E402
from fewstep_jax.export.workdir import export_from_workdir, load_run_params, run_export  # noqa: E402
from fewstep_jax.main import save_config  # noqa: E402
from fewstep_jax.sample_mode import run_student  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    """A tiny traflow distillation of gmm8 (12 steps), its config.json written as main does."""
    monkeypatch_module.syspath_prepend(".")
    from fewstep_jax.bench.distill import load_distill_config
    from fewstep_jax.train.loop import distill

    wd = tmp_path_factory.mktemp("run")
    c = load_distill_config(
        "gmm8",
        "traflow",
        12,
        {
            "model.width": 32,
            "train.batch_size": 64,
            "train.log_every": 6,
            "testbed.num_reference": 500,
            "eval.num_samples": 200,
            "sampler.nfes": (1, 2),
            "ema.decay": 0.5,
            "optim.warmup_steps": 2,
        },
    )
    distill(c, str(wd), evaluate=False)
    save_config(c, str(wd))
    return c, wd


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def export_config(out, **over):
    import sys

    sys.path.insert(0, os.getcwd())
    from configs.export import get_config

    c = get_config()
    c.export.out = str(out)
    c.export.update(over)
    return c


def test_exported_student_samples_like_jax(run, tmp_path):
    c, wd = run
    out = tmp_path / "exp"
    run_export(export_config(out), str(wd))
    cfg_all = json.loads((out / "config.json").read_text())["fewstep"]
    assert cfg_all["method"] == "traflow" and cfg_all["prediction"] == c.student.prediction
    assert cfg_all["student_form"] == c.student.form and cfg_all["uses_s"] is True
    assert cfg_all["sampler"]["grid"] == [1.0, 0.5, 0.0] and cfg_all["sampler"]["gamma"] == 0.0
    assert cfg_all["checkpoint_step"] == 12 and cfg_all["ema"] == "eval"
    assert "load_exported" in (out / "README.md").read_text()

    model, cfg = torch_models.load_exported(str(out))
    noise = np.random.default_rng(0).standard_normal((16, 2)).astype(np.float32)
    x_torch = torch_sampler.sample_exported(model, cfg, torch.from_numpy(noise)).numpy()
    params, _ = load_run_params(wd, "eval")
    x_jax = np.asarray(samplers.sample(run_student(c), params, jnp.asarray(noise), cfg["sampler"]["grid"]))
    assert np.abs(x_jax - noise).max() > 1e-2  # the student moved the noise
    np.testing.assert_allclose(x_torch, x_jax, atol=1e-4, rtol=0)


def test_ema_choice_and_dtype(run, tmp_path):
    _, wd = run
    raw, _ = load_run_params(wd, None)
    ev, _ = load_run_params(wd, "eval")
    key = "output_proj"
    assert np.abs(np.asarray(raw[key]["kernel"]) - np.asarray(ev[key]["kernel"])).max() > 0
    from safetensors.numpy import load_file

    export_from_workdir(wd, tmp_path / "raw", ema=None)
    w = load_file(str(tmp_path / "raw" / "model.safetensors"))[f"{key}.weight"]
    np.testing.assert_array_equal(w, np.asarray(raw[key]["kernel"]).T)
    tgt, _ = load_run_params(wd, "target")  # traflow keeps a target EMA: a third, different copy
    assert np.abs(np.asarray(tgt[key]["kernel"]) - np.asarray(ev[key]["kernel"])).max() > 0
    with pytest.raises(ValueError, match="ema must be one of"):
        export_from_workdir(wd, tmp_path / "t", ema="online")
    run_export(export_config(tmp_path / "bf", dtype="bfloat16", ema="raw", nfe=4, gamma=0.5), str(wd))
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())["fewstep"]
    assert cfg["dtype"] == "bfloat16" and cfg["ema"] == "raw"
    assert cfg["sampler"]["grid"] == [1.0, 0.75, 0.5, 0.25, 0.0] and cfg["sampler"]["gamma"] == 0.5


def test_existing_folder_is_kept_unless_overwrite(run, tmp_path):
    _, wd = run
    out = tmp_path / "exp"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exp"):
        run_export(export_config(out), str(wd))
    assert not (out / "config.json").exists()
    run_export(export_config(out, overwrite=True), str(wd))
    assert (out / "config.json").exists()


def test_missing_checkpoint_and_config_are_clear_errors(run, tmp_path):
    c, _ = run
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        export_from_workdir(tmp_path, tmp_path / "out")
    save_config(c, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "checkpoints"))):
        export_from_workdir(tmp_path, tmp_path / "out")
    # a workdir whose config.json is not a training run's (e.g. overwritten by another mode)
    (tmp_path / "config.json").write_text(ml_collections.ConfigDict({"mode": "export"}).to_json())
    with pytest.raises(ValueError, match="'export' run"):
        export_from_workdir(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"export\.out"):
        run_export(export_config(""), str(tmp_path))


def test_export_command_line_keeps_the_runs_config(tmp_path):
    """`--config=configs/export.py --workdir=<run>` must not overwrite the run's config.json."""
    import subprocess
    import sys

    run = tmp_path / "run"
    env = dict(__import__("os").environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    common = [sys.executable, "-m", "fewstep_jax.main"]
    r = subprocess.run(
        [
            *common,
            "--config=configs/distill.py:gmm8,traflow,4",
            f"--workdir={run}",
            "--config.model.width=16",
            "--config.eval.num_samples=100",
            "--config.testbed.num_reference=300",
            "--config.sampler.nfes=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    before = (run / "config.json").read_text()
    out = tmp_path / "exported"
    r = subprocess.run(
        [*common, "--config=configs/export.py", f"--workdir={run}", f"--config.export.out={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "config.json").read_text() == before
    assert (run / "export_config.json").exists() and (out / "config.json").exists()
