"""TDM / DMD loss terms: gradient flow, surrogate gradients, numerics, schedules, a 1-D training run."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fewstep_jax import models
from fewstep_jax.losses import distribution_matching as dm
from fewstep_jax.losses.api import LossInputs, get_factory
from fewstep_jax.paths import DDPM, RectifiedFlow
from fewstep_jax.schedules.tdm import TDMSchedule, make_schedule, step_intervals
from fewstep_jax.students import Student, model_apply
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params
from fewstep_jax.teachers.base import Teacher

RF = RectifiedFlow()


def _mlp(width=16, layers=1, steps=0):
    cfg = models.mlp_config()
    cfg.width, cfg.num_layers, cfg.emb_dim, cfg.num_step_classes = width, layers, 16, steps
    return models.build_model(cfg)


def _init(net, dim, seed, perturb=0.0):
    p = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim)), jnp.zeros((1,)))["params"]
    if perturb:  # non-zero everywhere (the output layer is zero-initialised)
        leaves, tree = jax.tree.flatten(p)
        keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
        leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        p = jax.tree.unflatten(tree, leaves)
    return p


def _inputs(teacher, stu, fake, others):
    return LossInputs(teacher, stu, {}, others, jnp.zeros((), jnp.int32), (("fake", fake),))


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def test_demo_integer_grid_and_continuous_grid():
    start, low = step_intervals(4, integer=True, total_steps=900)
    np.testing.assert_array_equal(start, [899, 674, 449, 224])
    np.testing.assert_array_equal(low, [675, 450, 225, 0])  # t_mid = t_k - 224 (pitfall 5)
    start, low = step_intervals(4, integer=False)
    np.testing.assert_allclose(start, [1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(low, [0.75, 0.5, 0.25, 0])


def test_tau_lies_in_the_steps_own_interval():
    sched = make_schedule(ml_collections.ConfigDict({"num_steps": (4,)}), DDPM(schedule="linear"))
    assert sched.integer and sched.tau_min == 20 and sched.tau_margin == 10
    _, j, start, low = sched.sample_steps(jax.random.PRNGKey(0), 4096)
    _, tau = sched.sample_mid_tau(jax.random.PRNGKey(1), start, low)
    tau, start, low = np.asarray(tau), np.asarray(start), np.asarray(low)
    assert np.all(tau == np.round(tau))  # integer timesteps, as the demo
    assert np.all(tau >= np.maximum(20, low)) and np.all(tau < start - 10 + 1e-6)
    assert set(np.unique(np.asarray(j))) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.asarray(sched.to_t(899.0)), 0.9)
    with pytest.raises(ValueError, match="interval"):
        TDMSchedule(interval="sideways")


def test_steps_aware_tables_pad_and_draw_each_k():
    sched = TDMSchedule(steps_set=(1, 2, 4))
    start, _ = sched.tables()
    np.testing.assert_allclose(start[0], [1, 1, 1, 1])
    np.testing.assert_allclose(start[1], [1, 0.5, 0.5, 0.5])
    kidx, j, _, _ = sched.sample_steps(jax.random.PRNGKey(0), 2048)
    kidx, j = np.asarray(kidx), np.asarray(j)
    assert set(np.unique(kidx)) == {0, 1, 2}
    assert np.all(j < np.array([1, 2, 4])[kidx])


# ---------------------------------------------------------------------------------------------
# pure numerics
# ---------------------------------------------------------------------------------------------


def test_importance_log_weight_is_the_demos_formula_and_clipped():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    eps_mix, z = jax.random.normal(k1, (6, 5)), jax.random.normal(k2, (6, 5))
    demo = jnp.exp(-0.5 * jnp.mean(eps_mix**2, 1)) / jnp.exp(-0.5 * jnp.mean(z**2, 1))
    np.testing.assert_allclose(np.exp(dm.importance_log_weight(eps_mix, z, clip=None)), demo, rtol=1e-5)
    big = dm.importance_log_weight(100.0 * eps_mix, z, clip=10.0)
    assert np.all(np.asarray(big) >= -10.0) and np.min(np.asarray(big)) == -10.0


def test_diffuse_matches_the_forward_process():
    # x_tau = a_tau x0 + s_tau eps_mix, and eps_mix is unit-variance when eps_mid and z are
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    x0, eps, z = (jax.random.normal(kk, (20000, 1)) for kk in k)
    t_mid, tau = jnp.full((20000,), 0.3), jnp.full((20000,), 0.7)
    x_tau, eps_mix = dm.diffuse(RF, RF.interpolate(x0, eps, t_mid), eps, t_mid, tau, z)
    np.testing.assert_allclose(x_tau, 0.3 * x0 + 0.7 * eps_mix, atol=1e-5)
    assert abs(float(jnp.var(eps_mix)) - 1.0) < 0.03


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_tdm_surrogate_gradient_is_the_dm_direction(distance):
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x0_hat, fake, real = (jax.random.normal(kk, (4, 3)) for kk in k)
    c, eps = 0.05, 1e-6
    g = jax.grad(lambda x: dm.tdm_surrogate(x, fake, real, distance, c, eps)[0])(x0_hat)
    d = fake - real
    wf = jnp.mean(jnp.abs(x0_hat - real), axis=1, keepdims=True) + eps
    dd = 2 * d if distance == "l2" else d / jnp.sqrt(d * d + c * c)
    np.testing.assert_allclose(g, dd / (wf * d.size), rtol=1e-5, atol=1e-8)
    # central differences of the loss with its target and normaliser frozen at x0_hat
    target = x0_hat - d
    dist = (lambda r: r * r) if distance == "l2" else (lambda r: jnp.sqrt(r * r + c * c) - c)
    frozen = lambda x: jnp.mean(dist(x - target) / wf)
    h = 1e-2
    e = jnp.zeros_like(x0_hat).at[0, 0].set(h)
    fd = float((frozen(x0_hat + e) - frozen(x0_hat - e)) / (2 * h))
    assert abs(fd - float(g[0, 0])) < 1e-2 * abs(float(g[0, 0]))


def test_dmd_surrogate_gradient_is_the_dmd2_grad():
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    x, fake, real = (jax.random.normal(kk, (4, 3)) for kk in k)
    g = jax.grad(lambda v: dm.dmd_surrogate(v, fake, real)[0])(x)
    p_real, p_fake = x - real, x - fake
    expected = (p_real - p_fake) / (jnp.mean(jnp.abs(p_real), axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(g, expected / x.size, rtol=1e-5)


def test_normaliser_eps_and_finite_flag():
    x = jnp.ones((3, 2))
    loss, m = dm.tdm_surrogate(x, x + 0.1, x, "pseudo_huber")  # x0_hat == real target: wf = 0
    assert np.isfinite(float(loss)) and float(m["normalizer_finite"]) == 1.0
    real = x.at[1].set(jnp.nan)
    loss, m = dm.tdm_surrogate(x, x, real, "l2")
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(m["normalizer_finite"]), 2 / 3)
    loss, m = dm.dmd_surrogate(x, x, real.at[2].set(jnp.inf))
    assert np.isfinite(float(loss)) and float(m["normalizer_finite"]) == pytest.approx(1 / 3)


def test_unknown_config_key_is_an_error():
    stu = Student(model_apply(_mlp()), RF)
    with pytest.raises(ValueError, match="huber_cc"):
        get_factory("tdm")(ml_collections.ConfigDict({"huber_cc": 1.0}), stu)


# ---------------------------------------------------------------------------------------------
# gradient flow
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gen,fake_term,cfg",
    [
        ("tdm", "tdm_fake", {"num_steps": (1, 2), "guidance": 2.0}),
        ("dmd", "dmd_fake", {}),
    ],
)
def test_gradients_reach_only_the_trained_network(gen, fake_term, cfg):
    tcfg = models.mlp_config()
    tcfg.width, tcfg.num_layers, tcfg.emb_dim, tcfg.num_classes = 16, 1, 16, 2
    net_c = models.build_model(tcfg)
    lab0 = jnp.zeros((1,), jnp.int32)
    tp = net_c.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)), label=lab0)
    tp = jax.tree.map(lambda x: x + 0.1, tp["params"])
    teacher = Teacher(
        params=tp,
        apply=lambda p, x, t, lab: net_c.apply({"params": p}, x, t, label=lab),
        path=RF,
        data_shape=(2,),
        num_classes=2,
    )
    net_s = _mlp(steps=3)
    # the student / fake are class-agnostic here (labels reach the teacher's CFG only)
    apply = lambda p, x, t, s, lab, g, ns, rngs, train: net_s.apply({"params": p}, x, t, num_steps=ns)
    stu = Student(apply, RF, uses_s=False)
    sp, fp = _init(net_s, 2, 1, 0.1), _init(net_s, 2, 2, 0.1)
    batch = {"noise": jax.random.normal(jax.random.PRNGKey(3), (8, 2)), "label": jnp.arange(8) % 2}
    rng = jax.random.PRNGKey(4)
    g_term = get_factory(gen)(ml_collections.ConfigDict(cfg), stu)
    f_cfg = {k: v for k, v in cfg.items() if k != "guidance"}
    f_term = get_factory(fake_term)(ml_collections.ConfigDict(f_cfg), stu)

    def gen_loss(sp, fp, tp):
        return g_term(sp, _inputs(teacher.replace(params=tp), stu, stu, {"fake": fp}), batch, rng)[0]

    def fake_loss(fp, sp, tp):
        return f_term(fp, _inputs(teacher.replace(params=tp), stu, stu, {"student": sp}), batch, rng)[0]

    norm = lambda g: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g)))
    gs, gf, gt = jax.jit(jax.grad(gen_loss, argnums=(0, 1, 2)))(sp, fp, tp)
    assert norm(gs) > 0 and norm(gf) == 0.0 and norm(gt) == 0.0
    hf, hs, ht = jax.jit(jax.grad(fake_loss, argnums=(0, 1, 2)))(fp, sp, tp)
    assert norm(hf) > 0 and norm(hs) == 0.0 and norm(ht) == 0.0


# ---------------------------------------------------------------------------------------------
# 1-D Gaussian teacher: the fake score tracks the student, the student matches the teacher
# ---------------------------------------------------------------------------------------------


def test_tdm_two_step_student_matches_a_gaussian_teacher():
    """K = 2 TDM on N(1.5, 0.5^2) with small MLPs (student and fake from the same fresh init).

    A fresh Euler-form student is the identity map (zero output layer), so its samples start as
    N(0, 1); there is no teacher network to copy into the fake score, so the fake is warmed up
    with 150 fake-only steps on the student's initial samples (the role DMD's "fake = teacher"
    initialisation plays when the student starts at the teacher). Then 1:1 alternating updates,
    fake lr = 5 x generator lr (docs/methods.md §4.3); Adam momenta are kept (b1 > 0) for the short run.
    """
    mu, c, K, B = 1.5, 0.5, 2, 256
    teacher = gaussian_mixture_teacher(gmm_params([[mu]], [[[c * c]]], [1.0]), RF, conditional=False)
    net = _mlp(width=64, layers=2)
    p0 = _init(net, 1, 0)
    stu = Student(model_apply(net), RF, uses_s=False)
    cfg = ml_collections.ConfigDict({"num_steps": (K,)})
    gen = get_factory("tdm")(ml_collections.ConfigDict({"num_steps": (K,), "distance": "l2"}), stu)
    fake_term = get_factory("tdm_fake")(cfg, stu)
    opt_f, opt_g = optax.adam(2.5e-3, b1=0.5, b2=0.95), optax.adam(5e-4, b1=0.9, b2=0.99)

    def step(state, inp):
        key, gen_on = inp
        sp, so, fp, fo = state
        kf, kg, nf, ng = jax.random.split(key, 4)
        fake_in = _inputs(teacher, stu, stu, {"student": sp})
        g = jax.grad(lambda p: fake_term(p, fake_in, {"noise": jax.random.normal(nf, (B, 1))}, kf)[0])(fp)
        u, fo = opt_f.update(g, fo, fp)
        fp = optax.apply_updates(fp, u)
        gen_in = _inputs(teacher, stu, stu, {"fake": fp})
        g = jax.grad(lambda p: gen(p, gen_in, {"noise": jax.random.normal(ng, (B, 1))}, kg)[0])(sp)
        u, so2 = opt_g.update(g, so, sp)
        sp2 = optax.apply_updates(sp, u)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(gen_on, x, y), a, b)
        return (keep(sp2, sp), keep(so2, so), fp, fo), None

    state = (p0, opt_g.init(p0), p0, opt_f.init(p0))
    n = 950
    flags = jnp.arange(n) >= 150
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    state, _ = jax.jit(lambda st: jax.lax.scan(step, st, (keys, flags)))(state)
    sp, _, fp, _ = state

    x = jax.random.normal(jax.random.PRNGKey(5), (4000, 1))
    for t, s in ((1.0, 0.5), (0.5, 0.0)):
        x = stu(sp, x, t, s)
    m, sd = float(jnp.mean(x)), float(jnp.std(x))
    assert abs(m - mu) < 0.25 and abs(sd - c) < 0.25, (m, sd)

    # the fake score's denoiser ~ the Gaussian posterior of the student's current last-step output,
    # on the last step's interval tau in (0, 0.5) where the fake sees that distribution
    for tau in (0.2, 0.4):
        xt = (1 - tau) * m + jnp.linspace(-1.5, 1.5, 21)[:, None] * jnp.sqrt((1 - tau) ** 2 * sd**2 + tau**2)
        post = m + (1 - tau) * sd**2 / ((1 - tau) ** 2 * sd**2 + tau**2) * (xt - (1 - tau) * m)
        x0_f = stu.x0_eps(fp, xt, jnp.full((21,), tau))[0]
        err = float(jnp.max(jnp.abs(x0_f - post)))
        assert err < 0.3, (tau, err)


# ---------------------------------------------------------------------------------------------
# degenerate (finite) normaliser guard: max_grad_scale / max_normalizer
# ---------------------------------------------------------------------------------------------


def test_collapsed_normaliser_makes_the_loss_nan_with_a_flag_and_zero_gradient():
    x = jnp.ones((3, 2))
    fake = x.at[1].add(0.1)  # sample 1: x0_hat == real (wf = 0) but the DM direction is not 0
    for surrogate in (
        lambda v, **kw: dm.tdm_surrogate(v, fake, x, "pseudo_huber", **kw),
        lambda v, **kw: dm.dmd_surrogate(v, fake, x, **kw),
    ):
        loss, m = surrogate(x)  # no limits: the finite (huge-gradient) loss of before
        assert np.isfinite(float(loss)) and float(m["nonfinite/normalizer"]) == 0.0
        np.testing.assert_allclose(float(m["grad_scale_max"]), 0.1 / 1e-6, rtol=1e-3)
        loss, m = surrogate(x, max_grad_scale=1e4)
        assert np.isnan(float(loss)) and float(m["nonfinite/normalizer"]) == 1.0
        g = jax.grad(lambda v, f=surrogate: f(v, max_grad_scale=1e4)[0])(x)
        assert np.all(np.asarray(g) == 0.0)  # NaN only in the value: a skipped step stays clean
        loss, m = surrogate(x + 1.0, max_grad_scale=1e4)  # healthy normaliser: scale O(0.1)
        assert np.isfinite(float(loss)) and float(m["nonfinite/normalizer"]) == 0.0
    # an exploded (finite) normaliser
    _, m = dm.dmd_surrogate(x + 1e6, x, x, max_normalizer=1e4)
    assert float(m["nonfinite/normalizer"]) == 1.0 and float(m["normalizer_max"]) == pytest.approx(1e6)


def test_guard_config_keys():
    stu = Student(model_apply(_mlp()), RF)
    for term in ("tdm", "dmd"):
        assert dm.NORMALIZER_GUARD.items() <= getattr(dm, f"{term.upper()}_DEFAULTS").items()
        get_factory(term)(ml_collections.ConfigDict({"max_grad_scale": None, "max_normalizer": None}), stu)
        with pytest.raises(ValueError, match="max_grad_scale"):
            get_factory(term)(ml_collections.ConfigDict({"max_grad_scale": 0.0}), stu)


@pytest.mark.parametrize("recipe", ["tdm", "dmd"])
def test_exploding_normaliser_stops_training_naming_it(tmp_path, recipe):
    """A teacher whose targets are huge but finite (means x 1e6): with the default limits the
    run stops at step 0 naming '<term>/normalizer' and the hint; nothing else is non-finite."""
    from fewstep_jax.data import NoiseSource
    from fewstep_jax.recipes import distill_config
    from fewstep_jax.testbeds.exact import make_testbed
    from fewstep_jax.train.loop import NonFiniteError, train
    from fewstep_jax.train.networks import distill_nets

    c = distill_config("gmm8", recipe, 3)
    for m in (c.model, c.aux_nets.fake.model):
        m.width, m.num_layers, m.emb_dim = 16, 1, 8
    c.train.batch_size, c.train.main_start, c.optim.warmup_steps = 16, 0, 0
    tb = make_testbed("gmm8", "rf", num_reference=100)
    far = tb.teacher.replace(params={**tb.teacher.params, "means": tb.teacher.params["means"] * 1e6})
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    with pytest.raises(NonFiniteError, match=rf"step 0 .*'{recipe}/normalizer'.*max_normalizer") as e:
        train(
            c,
            str(tmp_path),
            student_factory=lambda _: (main, aux),
            teacher=far,
            data_source=NoiseSource((2,), 16, 0, None, 0, 1),
        )
    assert "targets" not in str(e.value)  # finite targets: only the normaliser guard fired
