"""Trajectory-family recipes (fewstep_jax/recipes/trajectory.py): each builds a config whose loss
terms accept their options and trains a few steps; reflow's pair data is generated once and reused."""

import jax
import numpy as np
import pytest

from fewstep_jax.losses.api import get_factory
from fewstep_jax.models import build_model
from fewstep_jax.modes.distill import distill
from fewstep_jax.paths import get_path
from fewstep_jax.students import Student, model_apply

TINY = {
    "model.width": 16,
    "model.num_layers": 1,
    "model.emb_dim": 16,
    "train.batch_size": 16,
    "train.log_every": 1,
    "testbed.num_reference": 100,
}


def _config(recipe, steps, **over):
    from fewstep_jax.bench.distill import load_distill_config

    return load_distill_config("gmm8", recipe, steps, {**TINY, **over})


def _recipes():
    from fewstep_jax.recipes.trajectory import RECIPES

    return sorted(RECIPES)


def test_every_recipe_builds_terms_its_student_accepts():
    for name in _recipes():
        c = _config(name, 2)
        assert c.method == name and c.losses, name
        student = Student(
            model_apply(build_model(c.model)),
            get_path(c.testbed.path),
            form=c.student.form,
            prediction=c.student.prediction,
            uses_s=bool(c.model.use_s),
        )
        for term, cfg in c.losses.items():
            assert callable(get_factory(term)(cfg, student)), (name, term)  # unknown keys raise
    # the ablations differ from traflow exactly in the option they ablate
    base = _config("traflow", 2).losses.traflow
    assert _config("traflow_velB", 2).losses.traflow.vel_variant == "B" != base.vel_variant
    assert _config("traflow_vel0", 2).losses.traflow.lam_vel == 0.0 < base.lam_vel
    assert _config("traflow_vel1", 2).losses.traflow.lam_vel == 1.0
    assert not _config("traflow_no_s", 2).model.use_s and _config("traflow", 2).model.use_s
    uniform = _config("traflow_uniform", 2).losses.traflow
    assert uniform.jump_weighting == "uniform" != base.jump_weighting
    assert {k: v for k, v in uniform.items() if k != "jump_weighting"} == {
        k: v for k, v in base.items() if k != "jump_weighting"
    }


# the distinct loss terms run by default; the ablations (same term, other options) and the
# other families' recipes are slow-marked to keep this file fast on a shared 2-core machine
_FAST = ("traflow", "cd", "ctm")


@pytest.mark.parametrize(
    "name",
    [
        n if n in _FAST else pytest.param(n, marks=pytest.mark.slow)
        for n in _recipes()
        if not n.startswith("reflow")
    ],
)
def test_recipe_trains_a_few_steps(name, tmp_path):
    d = distill(_config(name, 2), str(tmp_path), evaluate=False)
    assert int(d.state.step) == 2
    leaves = [np.asarray(v) for v in jax.tree.leaves(d.state.params)]
    assert all(np.isfinite(v).all() for v in leaves)


@pytest.mark.parametrize("name", ["reflow_distill", pytest.param("reflow", marks=pytest.mark.slow)])
def test_pair_recipes_generate_pairs_once_and_reuse_them_on_resume(name, tmp_path):
    over = {"student.pairs.num": 48, "student.pairs.steps": 4}
    d = distill(_config(name, 2, **over), str(tmp_path), evaluate=False)
    assert int(d.state.step) == 2
    f = tmp_path / "pairs.npz"
    with np.load(f) as p:
        noise, x = p["noise"], p["x"]
    assert noise.shape == x.shape == (48, 2) and not np.allclose(noise, x)
    # the teacher maps noise near its data circle of radius 2 (gmm8), far from the noise
    assert abs(np.median(np.linalg.norm(x, axis=1)) - 2.0) < 0.3
    mtime = f.stat().st_mtime_ns
    d = distill(_config(name, 4, **over), str(tmp_path), evaluate=False)  # resumes at step 2
    assert int(d.state.step) == 4 and f.stat().st_mtime_ns == mtime


def test_pairs_mode_rejects_a_bad_data_mode(tmp_path):
    with pytest.raises(ValueError, match="pairs"):
        distill(_config("reflow", 1, **{"student.data": "pair"}), str(tmp_path), evaluate=False)
