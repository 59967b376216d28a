"""A teacher trained by train_teacher, loaded from its workdir, is a Teacher equal to its network."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax import solvers
from fewstep_jax.losses import api
from fewstep_jax.models import build_model
from fewstep_jax.modes.distill import distill
from fewstep_jax.modes.dryrun import load_config_file
from fewstep_jax.modes.train_teacher import train_teacher
from fewstep_jax.runs import writers
from fewstep_jax.teachers.neural import load_teacher_from_workdir


def tiny_config():
    c = load_config_file("configs/gmm8_teacher.py")
    c.model.width, c.model.num_layers, c.model.emb_dim = 32, 1, 16
    c.train.num_steps, c.train.batch_size, c.train.log_every = 4, 64, 2
    c.train.checkpoint_every, c.train.async_checkpoints = 2, False
    c.ema.decay = 0.5
    c.testbed.num_reference = 500
    c.eval.train_nfes, c.eval.train_solvers, c.eval.train_num_samples = (2,), ("euler",), 100
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    c = tiny_config()
    (workdir / "config.json").write_text(json.dumps(json.loads(c.to_json_best_effort())))
    state = train_teacher(c, str(workdir))
    return c, workdir, jax.tree.map(np.asarray, state.ema["eval"])


def test_loaded_teacher_matches_the_network(trained):
    c, workdir, ema = trained
    teacher = load_teacher_from_workdir(workdir)
    assert teacher.data_shape == (2,) and teacher.num_classes == 8 and teacher.path.name == "rf"
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
    t = jnp.linspace(0.1, 0.9, 16)
    label = jnp.arange(16) % 8
    want = build_model(c.model).apply({"params": ema}, x, t, label=label)
    np.testing.assert_allclose(teacher.velocity(x, t, label), want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(want))) > 0  # trained a little: not the zero-initialised output
    # the Teacher's solve is an Euler chain of that network
    grid = solvers.uniform_grid(2)
    y = x + (grid[1] - grid[0]) * teacher.velocity(x, jnp.full((16,), grid[0]), label)
    y = y + (grid[2] - grid[1]) * teacher.velocity(y, jnp.full((16,), grid[1]), label)
    np.testing.assert_allclose(teacher.solve(x, grid, "euler", label), y, rtol=1e-5, atol=1e-5)


def test_guidance_uses_the_null_label(trained):
    teacher = load_teacher_from_workdir(trained[1])
    x, t = jnp.ones((4, 2)), jnp.full((4,), 0.5)
    lab = jnp.array([0, 1, 2, 3])
    cond, unc = teacher.velocity(x, t, lab), teacher.velocity(x, t, None)
    np.testing.assert_allclose(
        teacher.velocity(x, t, lab, guidance=2.0), 2 * cond - unc, rtol=1e-4, atol=1e-5
    )


def test_missing_checkpoint_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort())
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "checkpoints"))):
        load_teacher_from_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_teacher_from_workdir(tmp_path / "nowhere")


@api.register("test_match_teacher")
def _match_teacher(cfg, student):
    """Student velocity (x, t -> s = 0) against the teacher's velocity at t (labels dropped)."""

    def term(params, inputs, batch, rng):
        x = batch["x"]
        t = jax.random.uniform(rng, (x.shape[0],), minval=0.1, maxval=1.0)
        target = jax.lax.stop_gradient(inputs.teacher.velocity(x, t))
        return jnp.mean((student.velocity(params, x, t, jnp.zeros_like(t)) - target) ** 2), {}

    return term


def test_distill_starts_from_the_teacher_network(trained, tmp_path):
    c = tiny_config()
    c.mode, c.teacher.workdir = "distill", str(trained[1])
    c.model.use_s = True  # an extra zero-initialised branch: the student starts as the teacher
    del c.losses["flow_matching"]
    c.losses.test_match_teacher = {"weight": 1.0}
    c.train.log_every = 1
    state = distill(c, str(tmp_path)).state
    rows = [r for r in writers.read_metrics(tmp_path) if "loss" in r]
    assert rows[0]["step"] == 1 and rows[0]["loss"] < 1e-10 and int(state.step) == c.train.num_steps
