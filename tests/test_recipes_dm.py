"""Distribution-matching recipes (TDM, TDM-unify, DMD, DMD2) wired into the engine: configs,
the fake warm-up (``train.main_start``), the steps-aware sampler and the divergence stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax.data import NoiseSource
from fewstep_jax.evaluation.distill_eval import steps_kw_fn
from fewstep_jax.recipes import distill_config
from fewstep_jax.recipes.distribution_matching import RECIPES
from fewstep_jax.testbeds.exact import make_testbed
from fewstep_jax.train.loop import NonFiniteError, _bad_terms, train
from fewstep_jax.train.networks import distill_nets
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import build_terms, make_step_fn

DM = ("tdm", "tdm_k1", "tdm_k2", "tdm_unify", "tdm_unify_l2", "dmd", "dmd2")


def _small(recipe, steps=6, main_start=None):
    c = distill_config("gmm8", recipe, steps)
    for m in (c.model, c.aux_nets.fake.model):
        m.width, m.num_layers, m.emb_dim = 16, 1, 8
    c.train.batch_size = 16
    c.train.log_every = 1
    c.optim.warmup_steps = 0
    if main_start is not None:
        c.train.main_start = main_start
    return c


@pytest.mark.parametrize("recipe", DM)
def test_recipe_configs_resolve_into_terms(recipe):
    assert set(DM) <= set(RECIPES)
    c = distill_config("gmm8", recipe, 1000)
    assert c.method == recipe and c.student.data == "noise" and c.student.form == "semilinear"
    fake = c.aux_nets.fake
    if recipe.startswith("dmd"):  # DMD2's setup: AdamW (0.9, 0.999), equal lrs, generator first
        assert fake.optim.lr == pytest.approx(c.optim.lr) and fake.order == "after_main"
        assert (fake.optim.b1, fake.optim.b2) == (0.9, 0.999) == (c.optim.b1, c.optim.b2)
    else:  # TDM's demo: betas (0, 0.95), fake lr 5x, the fake first
        assert fake.optim.lr == pytest.approx(5 * c.optim.lr) and fake.order == "first"
        assert (fake.optim.b1, fake.optim.b2) == (0.0, 0.95) == (c.optim.b1, c.optim.b2)
    assert fake.init_from_teacher and not fake.model.use_s and not c.model.use_s
    assert c.train.main_start == 100  # analytic teacher: 10% fake-only warm-up
    assert c.train.main_every == (5 if recipe == "dmd2" else 1)
    tb = make_testbed("gmm8", "rf", num_reference=100)
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    gen = build_terms(c.losses, main.student, "config.losses")  # unknown keys would raise
    fk = build_terms(fake.losses, aux["fake"].student, "fake.losses")
    assert [t.name for t in gen] == (["dmd"] if recipe.startswith("dmd") else ["tdm"])
    assert [t.name for t in fk] == (["dmd_fake"] if recipe.startswith("dmd") else ["tdm_fake"])


def test_unify_conditions_student_fake_and_sampler_on_k():
    c = distill_config("gmm8", "tdm_unify")
    assert c.model.num_step_classes == 3 == c.aux_nets.fake.model.num_step_classes
    assert tuple(c.losses.tdm.num_steps) == (1, 2, 4) == tuple(c.aux_nets.fake.losses.tdm_fake.num_steps)
    kw = steps_kw_fn(c)
    assert [int(kw(n)["num_steps"]) for n in (1, 2, 4)] == [0, 1, 2] and kw(8) is None
    assert steps_kw_fn(distill_config("gmm8", "tdm")) is None  # fixed K: no step condition


@pytest.mark.parametrize("name", ["tdm", "tdm_k1", "tdm_k2", "tdm_unify"])
def test_l2_variant_differs_only_in_the_distance(name):
    huber, l2 = distill_config("gmm8", name).to_dict(), distill_config("gmm8", f"{name}_l2").to_dict()
    assert huber["losses"]["tdm"].pop("distance") == "pseudo_huber"
    assert l2["losses"]["tdm"].pop("distance") == "l2"
    huber.pop("method"), l2.pop("method")
    assert huber == l2


def test_fake_warms_up_alone_before_the_generator_starts():
    c = _small("tdm_unify", steps=10, main_start=2)
    tb = make_testbed("gmm8", "rf", num_reference=100)
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    state = create_state(c, main.init, {"fake": aux["fake"].init})
    step = jax.jit(make_step_fn(c, main.student, {"fake": aux["fake"].student}))
    src = NoiseSource((2,), 16, 0, None, 0, 1)
    leaves = jax.tree.leaves
    changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    p0, f0 = state.params, state.aux["fake"]["params"]
    for i in range(2):
        state, m = step(state, tb.teacher, {k: jnp.asarray(v) for k, v in src.batch(i).items()})
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["fake/loss"]))
    assert not changed(p0, state.params) and changed(f0, state.aux["fake"]["params"])
    state, _ = step(state, tb.teacher, {k: jnp.asarray(v) for k, v in src.batch(2).items()})
    assert changed(p0, state.params)


@pytest.mark.parametrize("recipe,term", [("tdm", "tdm"), ("dmd", "dmd")])
def test_nan_teacher_stops_naming_the_targets(tmp_path, recipe, term):
    """The surrogate zeroes non-finite targets (finite loss); its flag still stops the run."""
    c = _small(recipe, main_start=0)
    tb = make_testbed("gmm8", "rf", num_reference=100)
    bad = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, tb.teacher)
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    with pytest.raises(NonFiniteError, match=rf"step 0 .*\['{term}/targets'\]"):
        train(
            c,
            str(tmp_path),
            student_factory=lambda _: (main, aux),
            teacher=bad,
            data_source=NoiseSource((2,), 16, 0, None, 0, 1),
        )


def test_bad_term_names_of_aux_networks():
    flags = {"nonfinite/tdm": 1.0, "fake/nonfinite/tdm_fake": 1.0, "tdm/nonfinite/targets": 0.0}
    assert _bad_terms(flags) == ["tdm", "fake/tdm_fake"]


def test_dmd_reg_is_dmd_plus_regression_on_teacher_pairs(tmp_path):
    from fewstep_jax.losses.api import LossInputs
    from fewstep_jax.modes.distill import distill

    c = _small("dmd_reg", steps=2, main_start=0)
    assert c.student.data == "pairs" and c.losses.dmd.reg_weight == 0.25
    tb = make_testbed("gmm8", "rf", num_reference=100)
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    state = create_state(c, main.init, {"fake": aux["fake"].init})
    reg, plain = (build_terms(cc.losses, main.student, "l")[0] for cc in (c, _small("dmd", 2, 0)))
    nets = (("fake", aux["fake"].student), ("student", main.student))
    others = {"fake": state.aux["fake"]["params"]}
    inputs = LossInputs(tb.teacher, main.student, state.ema, others, state.step, nets)
    z, x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 2))
    key = jax.random.PRNGKey(2)
    l_reg, m = reg.fn(state.params, inputs, {"noise": z, "x": x}, key)
    l_dm, _ = plain.fn(state.params, inputs, {"noise": z, "x": x}, key)
    # the generator starts from the pair's own prior sample z
    want = jnp.mean((main.student(state.params, z, 1.0, 0.0) - x) ** 2)
    np.testing.assert_allclose(float(m["regression"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(l_reg), float(l_dm) + 0.25 * float(want), rtol=1e-5)
    c.student.pairs.num, c.student.pairs.steps = 48, 4
    d = distill(c, str(tmp_path), evaluate=False)
    assert int(d.state.step) == 2 and (tmp_path / "pairs.npz").exists()
