"""TCD / LCM / DDIM scheduling parity with diffusers, and the TCD / LCM loss terms."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from fewstep_jax import solvers
from fewstep_jax.losses.api import LossInputs, get_factory
from fewstep_jax.losses.consistency import skip_times, tcf
from fewstep_jax.losses.distances import mean_distance as distance
from fewstep_jax.paths import DDPM, RectifiedFlow, VPCosine
from fewstep_jax.schedules import ddim_scheduler, ddim_solver, ddpm, lcm_scheduler, tcd_scheduler
from fewstep_jax.students import Student
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params

D = 6
PRED_TYPES = ("epsilon", "sample", "v_prediction")
ABAR = ddpm.alphas_cumprod()


def _model(seed=0):
    """A fixed random 'model' of (x, timestep), the same for torch and jax (float32)."""
    r = np.random.default_rng(seed)
    A = (r.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    b = r.standard_normal(D).astype(np.float32)

    def np_fn(x, t):
        return x @ A * np.float32(0.5 + t / 1000.0) + b * np.float32(np.cos(t / 100.0))

    return (
        np_fn,
        lambda x, t: jnp.asarray(np_fn(np.asarray(x), t)),
        lambda x, t: torch.from_numpy(np_fn(x.numpy(), int(t))),
    )


def _noises(n, seed=1):
    return np.random.default_rng(seed).standard_normal((max(n, 1), 3, D)).astype(np.float32)


def _run_diffusers(sch, module, monkeypatch, x, torch_fn, noises, **step_kw):
    calls = iter(noises)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(calls)))
    xt = torch.from_numpy(x)
    traj = [xt.numpy()]
    for t in sch.timesteps:
        xt = sch.step(torch_fn(xt, t), t, xt, **step_kw).prev_sample
        traj.append(xt.numpy())
    return traj


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_timesteps_match_diffusers(n):
    for kw in ({}, {"original_inference_steps": 50}, {"strength": 0.6}):
        sch = TCDScheduler()
        sch.set_timesteps(n, **kw)
        ours = tcd_scheduler.tcd_timesteps(
            n, kw.get("original_inference_steps"), strength=kw.get("strength", 1.0)
        )
        np.testing.assert_array_equal(ours, sch.timesteps.numpy())
        lcm = LCMScheduler()
        lcm.set_timesteps(n, **kw)
        np.testing.assert_array_equal(
            lcm_scheduler.lcm_timesteps(n, strength=kw.get("strength", 1.0)), lcm.timesteps.numpy()
        )
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddim.set_timesteps(n)
    np.testing.assert_array_equal(ddim_scheduler.ddim_timesteps(n), ddim.timesteps.numpy())
    assert tcd_scheduler.tcd_timesteps(4).tolist() == [999, 759, 499, 259]


def test_timestep_errors():
    with pytest.raises(ValueError, match="num_inference_steps 60"):
        tcd_scheduler.tcd_timesteps(60)
    with pytest.raises(ValueError, match="gamma"):
        tcd_scheduler.tcd_step(jnp.zeros((1, D)), 999, 0, jnp.zeros((1, D)), ABAR, 1.5, None)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_matches_diffusers_step_by_step(pred, n, monkeypatch):
    from diffusers.schedulers import scheduling_tcd

    _, jax_fn, torch_fn = _model()
    x = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    noises = _noises(n - 1)
    for gamma in (0.0, 0.3, 1.0):
        sch = TCDScheduler(prediction_type=pred)
        sch.set_timesteps(n)
        ref = _run_diffusers(sch, scheduling_tcd, monkeypatch, x, torch_fn, noises, eta=gamma)
        _, ours = tcd_scheduler.tcd_sample(
            jax_fn,
            jnp.asarray(x),
            tcd_scheduler.tcd_timesteps(n),
            ABAR,
            gamma,
            noises,
            pred,
            return_trajectory=True,
        )
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_and_ddim_match_diffusers(pred, n, monkeypatch):
    from diffusers.schedulers import scheduling_ddim, scheduling_lcm

    _, jax_fn, torch_fn = _model(3)
    x = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32)
    noises = _noises(n, seed=5)
    sch = LCMScheduler(prediction_type=pred)
    sch.set_timesteps(n)
    ref = _run_diffusers(sch, scheduling_lcm, monkeypatch, x, torch_fn, noises)
    _, ours = lcm_scheduler.lcm_sample(
        jax_fn, jnp.asarray(x), lcm_scheduler.lcm_timesteps(n), ABAR, noises, pred, return_trajectory=True
    )
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)

    for eta in (0.0, 0.5):
        ddim = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=pred,
            clip_sample=False,
            set_alpha_to_one=True,
        )
        ddim.set_timesteps(n)
        ref = _run_diffusers(ddim, scheduling_ddim, monkeypatch, x, torch_fn, noises, eta=eta)
        _, ours = ddim_scheduler.ddim_sample(
            jax_fn,
            jnp.asarray(x),
            ddim_scheduler.ddim_timesteps(n),
            ABAR,
            eta,
            noises,
            pred,
            return_trajectory=True,
        )
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


def test_tcd_gamma0_is_ddim_chain_and_gamma1_is_lcm():
    """gamma = 0: the DDIM solver of solvers.py on the same grid; gamma = 1: LCM multistep."""
    _, jax_fn, _ = _model(6)
    path = DDPM()
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, D)), jnp.float32)
    ts = tcd_scheduler.tcd_timesteps(4)
    ours = tcd_scheduler.tcd_sample(jax_fn, x, ts, ABAR, 0.0, None, "epsilon")

    def velocity(xx, t):  # the eps-model on the continuous DDPM path
        k = round(float(path.t_to_timestep(t[0])))
        return path.convert(jax_fn(xx, k), "eps", "flow", xx, t)

    grid = np.asarray(path.timestep_to_t(np.concatenate([ts, [0]])))
    x_ddim = x
    for t0, t1 in itertools.pairwise(grid):
        x_ddim = solvers.ddim_step(velocity, path, x_ddim, jnp.float32(t0), jnp.float32(t1))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(x_ddim), rtol=1e-4, atol=1e-4)

    # gamma = 1 is LCM multistep. diffusers' TCD lands on timestep 0 (abar[0] = 1 - 8.5e-4) where
    # LCM denoises to data, and LCM's c_skip(999) ~ 2.5e-9: with abar[0] := 1 the two chains agree
    abar1 = ABAR.copy()
    abar1[0] = 1.0
    noises = _noises(3, seed=8)
    a = tcd_scheduler.tcd_sample(jax_fn, x, ts, abar1, 1.0, noises, "epsilon")
    b = lcm_scheduler.lcm_sample(jax_fn, x, lcm_scheduler.lcm_timesteps(4), abar1, noises, "epsilon")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)
    c = tcd_scheduler.tcd_sample(jax_fn, x, ts, abar1, 0.3, noises, "epsilon")
    assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-2  # gamma matters


def test_ddim_solver_tables_and_skip_times():
    ts, prev, k = ddim_solver.ddim_solver_tables(ABAR, 50)
    assert k == 20 and ts[0] == 19 and ts[-1] == 999 and len(ts) == 50
    assert prev[0] == ABAR[0] and prev[1] == ABAR[19] and prev[-1] == ABAR[979]
    path = DDPM()
    t_start, t_prev = skip_times(path, 50)
    np.testing.assert_allclose(np.asarray(path.t_to_timestep(t_start)), ts, atol=1e-3)
    np.testing.assert_allclose(np.asarray(path.alpha(t_prev)) ** 2, prev, rtol=1e-5)
    t_start, t_prev = skip_times(RectifiedFlow(), 10)
    np.testing.assert_allclose(t_start - t_prev, 0.1, atol=1e-6)
    assert t_prev[0] == 0.0


# ---------------------------------------------------------------------------------------------
# TCF and the loss terms
# ---------------------------------------------------------------------------------------------


def _linear_student(path, form="semilinear", prediction="x0", uses_s=False):
    def apply(params, x, t, s, label, guidance, num_steps, rngs, train):
        g = 0.0 if guidance is None else guidance[:, None]
        return x @ params["A"] * (1.0 + t[:, None]) + params["b"] + g * params["c"]

    return Student(apply=apply, path=path, form=form, prediction=prediction, uses_s=uses_s)


def _params(seed=0, scale=0.3):
    r = np.random.default_rng(seed)
    return {
        "A": jnp.asarray(r.standard_normal((2, 2)) * scale, jnp.float32),
        "b": jnp.asarray(r.standard_normal(2) * scale, jnp.float32),
        "c": jnp.asarray(r.standard_normal(2) * scale, jnp.float32),
    }


@pytest.mark.parametrize("order", [1, 2])
def test_tcf_exact_at_s_equals_t(order):
    path = VPCosine()
    st = _linear_student(path)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)), jnp.float32)
    t = jnp.linspace(0.1, 0.9, 5)
    out = tcf(st, _params(), x, t, t, order)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_tcf1_is_euler_on_rf_and_tcf2_second_order():
    rf = RectifiedFlow()
    st = _linear_student(rf, prediction="flow")
    p = _params(1)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2)), jnp.float32)
    t, s = jnp.full((5,), 0.8), jnp.full((5,), 0.3)
    euler = x + (s - t)[:, None] * st.velocity(p, x, t)
    np.testing.assert_allclose(np.asarray(tcf(st, p, x, t, s, 1)), np.asarray(euler), rtol=1e-5, atol=1e-6)
    # TCF(2) of the analytic teacher's own predictions is closer to the true flow map than TCF(1)
    teacher = gaussian_mixture_teacher(
        gmm_params([[1.0, 0.0]], [np.eye(2) * 0.3], [1.0]), VPCosine(), conditional=False
    )
    st_t = Student(
        apply=lambda pp, xx, tt, ss, *a: teacher.predict(xx, tt),
        path=teacher.path,
        form="semilinear",
        prediction="flow",
        uses_s=False,
    )
    t, s = jnp.full((5,), 0.6), jnp.full((5,), 0.3)
    true = teacher.solve(x, np.linspace(0.6, 0.3, 200), "rk4")
    e1 = np.abs(np.asarray(tcf(st_t, None, x, t, s, 1)) - np.asarray(true)).max()
    e2 = np.abs(np.asarray(tcf(st_t, None, x, t, s, 2)) - np.asarray(true)).max()
    assert e2 < 0.3 * e1, (e1, e2)


def _gmm_teacher(path):
    params = gmm_params([[1.5, 0.0], [-1.5, 0.5]], [np.eye(2) * 0.2] * 2, [0.5, 0.5])
    return gaussian_mixture_teacher(params, path, conditional=True)


def _inputs(teacher, student, target_params):
    return LossInputs(
        teacher=teacher, student=student, ema={"target": target_params}, others={}, step=jnp.int32(0)
    )


@pytest.mark.parametrize("name", ["tcd", "lcm"])
def test_loss_gradients_flow_only_to_student(name):
    path = DDPM()
    st = _linear_student(path)
    teacher = _gmm_teacher(path)
    cfg = ml_collections.ConfigDict({"weight": 1.0, "w_min": 0.5, "w_max": 2.0, "guidance_embed": True})
    term = get_factory(name)(cfg, st)
    batch = {
        "x": jnp.asarray(np.random.default_rng(0).standard_normal((16, 2)), jnp.float32),
        "label": jnp.asarray(np.arange(16) % 2, jnp.int32),
    }
    p, pt = _params(0), _params(1)
    rng = jax.random.PRNGKey(0)

    floats = {k: v for k, v in teacher.params.items() if k != "labels"}

    def f(p, tp, teach_floats):
        teach = teacher.replace(params={**teacher.params, **teach_floats})
        return term(p, _inputs(teach, st, tp), batch, rng)[0]

    g_s, g_t, g_teacher = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p, pt, floats)
    assert all(float(jnp.abs(v).sum()) == 0.0 for v in jax.tree.leaves(g_t))
    assert all(float(jnp.abs(v).sum()) == 0.0 for v in jax.tree.leaves(g_teacher))
    assert float(jnp.abs(g_s["A"]).sum()) > 0 and float(jnp.abs(g_s["c"]).sum()) > 0  # c: guidance branch
    # online target: still no gradient through the target branch (value equals the EMA with tp = p)
    cfg_on = ml_collections.ConfigDict({**cfg.to_dict(), "target": "online"})
    term_on = get_factory(name)(cfg_on, st)
    both = jax.jit(
        lambda p, pt: (
            term_on(p, _inputs(teacher, st, pt), batch, rng)[0],
            term(p, _inputs(teacher, st, p), batch, rng)[0],
        )
    )
    l_on, l_ema = both(p, pt)
    np.testing.assert_allclose(float(l_on), float(l_ema), rtol=1e-6)


@functools.partial(jax.jit, static_argnums=3)
def _tcd_by_hand(teacher, x, rng, num):
    path = teacher.path
    t_start, t_prev = skip_times(path, num)
    k_idx, k_end, _, k_eps = jax.random.split(rng, 4)
    idx = jax.random.randint(k_idx, (x.shape[0],), 0, num)
    end = jax.random.randint(k_end, (x.shape[0],), 0, idx + 1)
    eps = jax.random.normal(k_eps, x.shape)
    t_hi, t_lo, t_m = jnp.asarray(t_start)[idx], jnp.asarray(t_prev)[idx], jnp.asarray(t_prev)[end]
    x_hi = path.interpolate(x, eps, t_hi)
    v = teacher.velocity(x_hi, t_hi)
    x_lo = x_hi + (t_lo - t_hi)[:, None] * v
    pred = x_hi + (t_m - t_hi)[:, None] * v
    tgt = x_lo + (t_m - t_lo)[:, None] * teacher.velocity(x_lo, t_lo)
    return jnp.mean(jnp.mean((pred - tgt) ** 2, 1))


def test_tcd_loss_zero_for_exact_student_and_target_formula():
    """A student returning the (unguided) teacher's own prediction on the RF path: TCF(1) = DDIM, so
    f_theta(x_hi, t_hi, t_m) equals f(DDIM(x_hi -> t_lo), t_lo, t_m) only when t_m = t_lo; check the
    loss against a direct computation of the target formula on fixed numbers instead."""
    path = RectifiedFlow()
    teacher = _gmm_teacher(path)
    st = Student(
        apply=lambda pp, xx, tt, ss, lab, g, n, r, tr: pp["scale"] * teacher.predict(xx, tt, lab),
        path=path,
        form="semilinear",
        prediction="flow",
        uses_s=False,
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2)), jnp.float32)
    batch = {"x": x}
    rng = jax.random.PRNGKey(3)
    for num in (1, 10):
        cfg = ml_collections.ConfigDict({"num_ddim_timesteps": num})
        term = jax.jit(get_factory("tcd")(cfg, st))
        exact = {"scale": jnp.float32(1.0)}
        loss, _ = term(exact, _inputs(teacher, st, exact), batch, rng)
        if num == 1:  # t_hi = 1, t_lo = t_m = 0: the teacher's DDIM jump IS the student's jump
            assert float(loss) < 1e-10
        # recompute by hand with the same random draws
        np.testing.assert_allclose(float(loss), float(_tcd_by_hand(teacher, x, rng, num)), rtol=1e-4)
    # pseudo-Huber distance on fixed numbers
    a, b = jnp.array([[0.0, 3.0]]), jnp.array([[4.0, 3.0]])
    np.testing.assert_allclose(
        float(distance(a, b, "huber", 1e-3)), 0.5 * (np.sqrt(16 + 1e-6) - 1e-3), rtol=1e-6
    )
    np.testing.assert_allclose(float(distance(a, b, "l2")), 8.0)


def test_lcm_target_formula_and_config_errors():
    path = DDPM()
    c_skip, c_out = lcm_scheduler.lcm_boundary_scalings(jnp.array([0.0, 19.0, 999.0]))
    np.testing.assert_allclose(
        np.asarray(c_skip), [1.0, 0.25 / (190.0**2 + 0.25), 0.25 / (9990.0**2 + 0.25)], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(c_out),
        [0.0, 190.0 / np.sqrt(190.0**2 + 0.25), 9990 / np.sqrt(9990.0**2 + 0.25)],
        rtol=1e-6,
    )
    st = _linear_student(path)
    with pytest.raises(ValueError, match="unknown config keys"):
        get_factory("lcm")(ml_collections.ConfigDict({"bogus": 1}), st)
    with pytest.raises(ValueError, match="semi-linear"):
        get_factory("tcd")(ml_collections.ConfigDict({}), _linear_student(path, form="euler"))
    term = get_factory("tcd")(ml_collections.ConfigDict({}), st)
    inputs = LossInputs(teacher=_gmm_teacher(path), student=st, ema={}, others={}, step=jnp.int32(0))
    with pytest.raises(ValueError, match="target"):
        term(_params(), inputs, {"x": jnp.zeros((2, 2))}, jax.random.PRNGKey(0))
