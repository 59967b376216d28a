"""TCD / LCM recipes and the VP teacher configs: each builds, trains a few steps and samples on the
time grid the student was trained on."""

import jax
import numpy as np
import pytest

from fewstep_jax import solvers
from fewstep_jax.losses.consistency import skip_times
from fewstep_jax.paths import get_path

TINY = {
    "model.width": 32,
    "model.num_layers": 1,
    "model.emb_dim": 16,
    "train.batch_size": 64,
    "train.log_every": 2,
    "testbed.num_reference": 500,
}


@pytest.fixture
def load():
    from fewstep_jax.bench.distill import load_distill_config

    return load_distill_config


def test_tcd_grid_is_the_scheduler_grid_and_lies_on_the_training_grid():
    path = get_path("ddpm")
    np.testing.assert_allclose(solvers.make_grid("tcd", 4, path), [1.0, 0.76, 0.5, 0.26, 0.0], atol=1e-6)
    t_start, _ = skip_times(path, 50)
    for n in (1, 2, 4, 8):
        g = solvers.make_grid("tcd", n, path)
        assert len(g) == n + 1 and g[-1] == 0.0
        assert all(np.isclose(t_start, t, atol=1e-6).any() for t in g[:-1]), (n, g)
    with pytest.raises(ValueError, match="num_inference_steps"):
        solvers.make_grid("tcd", 51, path)


@pytest.mark.parametrize(
    "name", ["tcd", "lcm", "tcd_s", "tcd2", "tcd_huber", "tcd_cfg", "tcd_s_cfg", "lcm_cfg"]
)
def test_recipes_configure_a_vp_semilinear_student(load, name):
    c = load("gmm8", name, 10)
    assert c.method == name and c.testbed.path == "ddpm"
    assert c.student.form == "semilinear" and c.model.use_s == name.startswith("tcd_s")
    assert c.ema.target_decay == 0.95 and c.sampler.grid == "tcd" and c.eval.grid == "tcd"
    (term,) = c.losses.values()
    assert term["num_ddim_timesteps"] == 50
    guided = name.endswith("_cfg")
    assert (term.get("w_max", 0.0) > 0) == guided and (c.model.num_classes == 8) == guided
    if name.startswith("tcd"):
        assert tuple(c.sampler.gammas) == (0.0, 0.2, 0.3, 0.5, 1.0)
    else:
        assert tuple(c.sampler.gammas) == (1.0,)
    # a path given on the command line wins over the recipe's ddpm default
    assert load("gmm8", name, 10, {"testbed.path": "vp_cosine"}).testbed.path == "vp_cosine"


def test_guided_recipe_needs_a_labelled_testbed():
    from fewstep_jax.recipes import base
    from fewstep_jax.recipes.tcd import RECIPES

    c = base.get_config()
    c.testbed.name = "unlabelled"
    with pytest.raises(ValueError, match="labelled testbed"):
        RECIPES["tcd_cfg"](c)


@pytest.mark.parametrize("name", ["tcd", "lcm", "tcd_cfg"])
def test_recipe_trains_and_samples(load, tmp_path, name):
    from fewstep_jax import samplers
    from fewstep_jax.modes.distill import distill

    c = load("gmm8", name, 4, TINY)
    d = distill(c, str(tmp_path), evaluate=False)
    assert int(d.state.step) == 4
    # the target EMA equals the params unless an update changed them
    target, params = jax.tree.leaves(d.state.ema["target"]), jax.tree.leaves(d.state.params)
    assert any(not np.allclose(a, b) for a, b in zip(target, params, strict=True)), "params never updated"
    kw = {}
    if name == "tcd_cfg":
        kw = {"label": jax.numpy.zeros((16,), jax.numpy.int32), "guidance": jax.numpy.ones((16,))}
    grid = solvers.make_grid(c.sampler.grid, 4, d.student.path)
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
    x = samplers.sample(d.student, d.params(), noise, grid, gamma=0.3, rng=jax.random.PRNGKey(1), **kw)
    assert x.shape == (16, 2) and np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize(("module", "prediction"), [("gmm8_vp_teacher", "eps"), ("gmm8_vp_v_teacher", "v")])
def test_vp_teacher_configs(module, prediction):
    from fewstep_jax.modes.dryrun import load_config_file

    c = load_config_file(f"configs/{module}.py")
    assert c.mode == "train_teacher" and c.testbed.path == "ddpm" and c.teacher.prediction == prediction
    assert c.model.num_classes == 8 and c.losses.diffusion["label_dropout"] > 0
    assert c.losses.diffusion["t_sampling"] == "discrete"


def test_vp_teacher_trains(monkeypatch, tmp_path):
    import json

    from fewstep_jax.modes.dryrun import load_config_file
    from fewstep_jax.modes.train_teacher import train_teacher

    c = load_config_file("configs/gmm8_vp_teacher.py")
    for k, v in {**TINY, "train.num_steps": 3, "train.checkpoint_every": 3}.items():
        node, leaf = k.split(".")
        c[node][leaf] = v
    c.eval.train_nfes = (2,)
    c.eval.train_solvers = ("ddim",)
    c.eval.train_num_samples = 64
    state = train_teacher(c, str(tmp_path))
    assert int(state.step) == 3
    ev = json.loads((tmp_path / "teacher_eval.json").read_text())["eval"]
    assert np.isfinite(ev["eval/ddim_nfe2/sw2"])
