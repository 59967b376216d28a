"""Export of a trained workdir (mode ``export``): loads in plain PyTorch, samples like JAX, records
no local path, errors; the command line without torch (the export works, the self-check says what
to install)."""

import json
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_main import cli, error_line, finish

from fewstep_jax import samplers
from fewstep_jax.export.workdir import export_from_workdir, load_run_params
from fewstep_jax.main import save_config
from fewstep_jax.modes.export import run as run_export
from fewstep_jax.modes.sample import run_student

try:  # the tests without torch run without the extra too
    import torch

    from fewstep_jax.export import torch_models, torch_sampler
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason='needs the torch extra: pip install "fewstep-jax[torch]"'
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    """A tiny traflow distillation of gmm8 (12 steps), its config.json written as main does."""
    from fewstep_jax.bench.distill import load_distill_config
    from fewstep_jax.modes.distill import distill

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
    from fewstep_jax.modes.dryrun import load_config_file

    c = load_config_file("configs/export.py")
    c.export.out = str(out)
    c.export.update(over)
    return c


@needs_torch
def test_exported_student_samples_like_jax(run, tmp_path):
    c, wd = run
    out = tmp_path / "exp"
    run_export(export_config(out), str(wd))
    cfg_all = json.loads((out / "fewstep.json").read_text())
    assert cfg_all["method"] == "traflow" and cfg_all["prediction"] == c.student.prediction
    assert cfg_all["student_form"] == c.student.form and cfg_all["uses_s"] is True
    assert cfg_all["sampler"]["grid"] == [1.0, 0.5, 0.0] and cfg_all["sampler"]["gamma"] == 0.0
    assert cfg_all["checkpoint_step"] == 12 and cfg_all["ema"] == "eval"
    assert cfg_all["source_run"] == wd.name
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
    cfg = json.loads((tmp_path / "bf" / "fewstep.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["ema"] == "raw"
    assert cfg["sampler"]["grid"] == [1.0, 0.75, 0.5, 0.25, 0.0] and cfg["sampler"]["gamma"] == 0.5


def test_existing_folder_is_kept_unless_overwrite(run, tmp_path):
    _, wd = run
    out = tmp_path / "exp"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exp"):
        run_export(export_config(out), str(wd))
    assert not (out / "fewstep.json").exists()
    run_export(export_config(out, overwrite=True), str(wd))
    assert (out / "fewstep.json").exists()


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


def strings(tree):
    """Every string of a JSON tree, keys included."""
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in [k, *strings(v)]]
    if isinstance(tree, list):
        return [s for v in tree for s in strings(v)]
    return [tree] if isinstance(tree, str) else []


@needs_torch
def test_export_records_no_local_path_and_passes_its_self_check(run, tmp_path, capsys):
    """The folder is for other machines: nothing in it names where the run was trained."""
    _, wd = run
    out = tmp_path / "exp"
    run_export(export_config(out, check=True), str(wd))
    assert "self-check passed" in capsys.readouterr().out
    machine = [str(wd.parent), os.path.expanduser("~"), os.getcwd()]
    for name in sorted(os.listdir(out)):
        data = (out / name).read_bytes()  # model.safetensors is binary: search its bytes
        absolute = (
            [s for s in strings(json.loads(data)) if s.startswith("/")] if name.endswith(".json") else []
        )
        assert absolute == [] and not any(m.encode() in data for m in machine), (name, absolute)


def test_command_line_export_without_torch(run, tmp_path):
    _, wd = run
    no_torch, out = ("torch", "diffusers"), tmp_path / "exported"
    args = ["--config=configs/export.py", f"--workdir={wd}"]
    before = (wd / "config.json").read_text()
    (r,) = finish([cli([*args, f"--config.export.out={out}"], block=no_torch)])
    assert r.returncode == 0, r.stderr[-3000:]
    # `--config=configs/export.py --workdir=<run>` must not overwrite the run's config.json
    assert (wd / "config.json").read_text() == before and (wd / "export_config.json").exists()
    from safetensors.numpy import load_file

    params, _ = load_run_params(wd, "eval")
    w = load_file(str(out / "model.safetensors"))["output_proj.weight"]
    np.testing.assert_array_equal(w, np.asarray(params["output_proj"]["kernel"]).T)
    assert json.loads((out / "fewstep.json").read_text())["method"] == "traflow"
    # the self-check needs torch: one line naming the extra, before anything is written
    checked = tmp_path / "checked"
    (r,) = finish(
        [cli([*args, f"--config.export.out={checked}", "--config.export.check=True"], block=no_torch)]
    )
    line = error_line(r)
    assert 'pip install "fewstep-jax[torch]"' in line and "self-check" in line
    assert not checked.exists()
