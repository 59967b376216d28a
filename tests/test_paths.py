"""Paths and prediction conversions (docs/methods.md §1.1, 8): round trips, identities, endpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax.paths import DDPM, PREDICTIONS, check_time, ddpm_betas, edm_sigma, get_path

PATH_NAMES = ["rf", "vp_cosine", "vp_linear", "ddpm", "ve"]


@pytest.mark.parametrize("name", PATH_NAMES)
def test_prediction_round_trips(name):
    path = get_path(name)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.normal(k1, (64, 3, 3, 2))
    eps = jax.random.normal(k2, (64, 3, 3, 2))
    t = jax.random.uniform(k3, (64,), minval=0.02, maxval=0.98)
    x = path.interpolate(x0, eps, t)
    for kind in PREDICTIONS:
        pred = path.from_x0_eps(kind, x0, eps, t)
        x0_r, eps_r = path.to_x0_eps(pred, kind, x, t)
        scale = 1.0 if name != "ve" else 80.0  # VE states are sigma-scaled
        np.testing.assert_allclose(x0_r, x0, atol=2e-4 * scale, err_msg=kind)
        np.testing.assert_allclose(eps_r, eps, atol=2e-4, err_msg=kind)
        for other in PREDICTIONS:
            back = path.convert(path.convert(pred, kind, other, x, t), other, kind, x, t)
            np.testing.assert_allclose(back, pred, rtol=2e-3, atol=2e-3 * scale, err_msg=f"{kind}->{other}")


@pytest.mark.parametrize("name", PATH_NAMES)
def test_flow_is_time_derivative_of_interpolant(name):
    path = get_path(name)
    x0, eps = jnp.ones((4, 2)), -0.5 * jnp.ones((4, 2))
    t = jnp.array([0.1, 0.3, 0.6, 0.9])
    _, dx = jax.jvp(lambda tt: path.interpolate(x0, eps, tt), (t,), (jnp.ones(4),))
    np.testing.assert_allclose(path.from_x0_eps("flow", x0, eps, t), dx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_logsnr_inverse(name):
    path = get_path(name)
    t = jnp.linspace(0.01, 0.99, 33)
    np.testing.assert_allclose(path.t_from_logsnr(path.logsnr(t)), t, atol=5e-6)


def test_rectified_flow_conventions():
    rf = get_path("rf")
    a, s, da, ds = rf.derivatives(jnp.array([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(a, [1.0, 0.75, 0.0])
    np.testing.assert_allclose(s, [0.0, 0.25, 1.0])
    np.testing.assert_allclose(da, -1.0)
    np.testing.assert_allclose(ds, 1.0)
    # u = eps - x0 and x0 = x_t - t u (docs/methods.md §1.1)
    x0, eps, t = jnp.full((2, 1), 2.0), jnp.full((2, 1), -1.0), jnp.array([0.3, 0.7])
    u = rf.from_x0_eps("flow", x0, eps, t)
    np.testing.assert_allclose(u, -3.0)
    np.testing.assert_allclose(rf.interpolate(x0, eps, t) - t[:, None] * u, x0, rtol=1e-6)


def test_vp_paths_preserve_variance_and_cosine_hits_pure_noise():
    for name in ["vp_cosine", "vp_linear", "ddpm"]:
        a, s = get_path(name).alpha_sigma(jnp.linspace(0.0, 1.0, 11))
        np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-5)
    a1, s1 = get_path("vp_cosine").alpha_sigma(jnp.array(1.0))
    assert float(a1) == 0.0 and float(s1) == 1.0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_ddpm_discrete_schedule_exact(schedule):
    kw = dict(beta_start=0.0001, beta_end=0.02) if schedule == "linear" else {}
    path = DDPM(schedule=schedule, **kw)
    betas = ddpm_betas(schedule, 1000, path.beta_start, path.beta_end)
    abar = np.cumprod(1.0 - betas)
    ks = np.array([0, 1, 19, 499, 998, 999])
    t = path.timestep_to_t(ks)
    np.testing.assert_allclose(path.alpha(t) ** 2, abar[ks], rtol=2e-5)
    np.testing.assert_allclose(path.t_to_timestep(t), ks, atol=1e-3)
    assert float(path.alpha(0.0)) == 1.0  # t = 0 is clean data (diffusers' final_alpha_cumprod = 1)
    # diffusers' own table for the same schedule
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule=schedule, beta_start=path.beta_start, beta_end=path.beta_end)
    np.testing.assert_allclose(abar, sched.alphas_cumprod.numpy(), rtol=1e-5)


def test_edm_sigma_of_rf_is_t_over_one_minus_t():
    t = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(edm_sigma(get_path("rf"), t), t / (1 - t), rtol=1e-6)


def test_rescale_between_paths_matches_marginals():
    """A state of one path maps to the same noisy point of another (docs/methods.md §1.1 table)."""
    rf, vp = get_path("rf"), get_path("vp_cosine")
    x0 = jnp.ones((3, 2)) * 0.7
    eps = jnp.array([[0.1, -0.2], [1.0, 0.5], [-1.0, 2.0]])
    t = jnp.array([0.2, 0.5, 0.8])
    x_vp = vp.interpolate(x0, eps, t)
    x_rf, t_rf = vp.rescale_to(x_vp, t, rf)
    np.testing.assert_allclose(x_rf, rf.interpolate(x0, eps, t_rf), atol=1e-5)


def test_conversions_finite_at_endpoints_for_stable_carriers():
    rf = get_path("rf")
    x = jnp.ones((2, 2))
    for t in (0.0, 1.0):
        tt = jnp.full((2,), t)
        for kind in ("flow", "v"):
            x0, eps = rf.to_x0_eps(jnp.ones((2, 2)), kind, x, tt)
            assert np.isfinite(x0).all() and np.isfinite(eps).all()


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("sde")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_time(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="unknown prediction"):
        get_path("rf").to_x0_eps(jnp.ones((1, 1)), "noise", jnp.ones((1, 1)), jnp.ones(1))
    with pytest.raises(ValueError, match="unknown DDPM beta schedule"):
        DDPM(schedule="cosine").alphas_cumprod()


def test_ddpm_linear_is_diffusers_linear_schedule():
    import torch
    from diffusers import DDPMScheduler

    path = get_path("ddpm_linear")
    assert isinstance(path, DDPM) and path.schedule == "linear" and path == get_path("ddpm_linear")
    ref = DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(torch.float64).numpy()
    np.testing.assert_allclose(path.alphas_cumprod(), ref, rtol=1e-6)
    t = path.timestep_to_t(np.arange(1000))
    np.testing.assert_allclose(np.asarray(path.alpha(t)) ** 2, ref, rtol=1e-4, atol=1e-7)
    # not the scaled_linear table of "ddpm" (abar(T) 2.1e-3 vs 4.0e-5)
    assert path != get_path("ddpm") and abs(get_path("ddpm").alphas_cumprod()[-1] - ref[-1]) > 1e-3


def test_tcd_recipe_trains_on_the_linear_ddpm_path(tmp_path):
    from fewstep_jax.modes.distill import distill
    from fewstep_jax.recipes import distill_config
    from fewstep_jax.runs.writers import read_metrics

    c = distill_config("gmm8", "tcd", 3)
    c.testbed.path = "ddpm_linear"  # the recipe keeps a non-rf path
    c.model.width, c.model.num_layers, c.model.emb_dim = 16, 1, 8
    c.train.batch_size, c.train.log_every, c.testbed.num_reference = 16, 1, 100
    d = distill(c, str(tmp_path), evaluate=False)
    assert int(d.state.step) == 3 and d.student.path == d.teacher.path == get_path("ddpm_linear")
    rows = [r for r in read_metrics(str(tmp_path)) if "loss/tcd" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss/tcd"]) for r in rows)
