"""Generic few-step samplers: chains of flow maps with TCD / CTM re-noising."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax import samplers, solvers
from fewstep_jax.paths import DDPM, VE, RectifiedFlow, VPCosine, bcast, edm_sigma
from fewstep_jax.students import Student
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params

C = 0.7  # std of the Gaussian data of the analytic flow map


def gaussian_flow_map(path):
    """Exact PF-ODE flow map of data N(0, C^2 I): x_s = (std_s / std_t) x_t, std^2 = alpha^2 C^2 + sigma^2."""

    def std(t):
        a, s = path.alpha_sigma(t)
        return jnp.sqrt(a * a * C * C + s * s)

    return lambda x, t, s: x * bcast(std(s) / std(t), x)


@pytest.mark.parametrize("path", [RectifiedFlow(), VPCosine(), DDPM()], ids=lambda p: p.name)
def test_forward_diffuse_preserves_marginal(path):
    n = 200_000
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = C * jax.random.normal(k0, (n, 1))
    s, t = jnp.float32(0.3), jnp.float32(0.7)
    x_s = path.interpolate(x0, jax.random.normal(k1, (n, 1)), s)
    x_t = samplers.forward_diffuse(path, x_s, s, t, jax.random.normal(k2, (n, 1)))
    a, sg = path.alpha_sigma(t)
    np.testing.assert_allclose(float(jnp.var(x_t)), float(a * a * C * C + sg * sg), rtol=1.5e-2)
    np.testing.assert_allclose(float(jnp.mean(x_t * x0)), float(a * C * C), rtol=2e-2)
    # s = t is the identity
    np.testing.assert_allclose(
        np.asarray(samplers.forward_diffuse(path, x_s[:5], t, t, x_s[5:10])), np.asarray(x_s[:5]), atol=1e-6
    )


def test_intermediate_time_parameterisations():
    path = VE()
    t_next = jnp.array([0.5, 0.1, 0.0])
    np.testing.assert_allclose(
        np.asarray(samplers.intermediate_time(path, t_next, 0.3, "tcd")), 0.7 * np.asarray(t_next)
    )
    np.testing.assert_array_equal(
        np.asarray(samplers.intermediate_time(path, t_next, 0.0, "ctm")), np.asarray(t_next)
    )
    s = samplers.intermediate_time(path, t_next, 0.6, "ctm")
    sig, sig_s = np.asarray(edm_sigma(path, t_next)), np.asarray(edm_sigma(path, s))
    np.testing.assert_allclose(sig_s[:2], 0.8 * (sig[:2] - 0.002) + 0.002, rtol=1e-5)
    assert float(s[2]) == 0.0
    with pytest.raises(ValueError, match="gamma parameterisation"):
        samplers.intermediate_time(path, t_next, 0.3, "bogus")


def test_chain_of_exact_flow_map_reproduces_teacher_flow_map():
    """G = the analytic teacher's fine RK4 solve over [s, t]: every NFE lands on the same Phi(x, 1, 0)."""
    path = RectifiedFlow()
    teacher = gaussian_mixture_teacher(
        gmm_params([[1.5, 0.0], [-1.0, 1.0]], [np.eye(2) * 0.1] * 2, [0.4, 0.6]), path, conditional=False
    )
    fine = 16

    def flow_map(x, t, s):
        return teacher.solve(x, jnp.linspace(t[0], s[0], fine + 1), "rk4")

    x1 = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    ref = np.asarray(teacher.solve(x1, np.linspace(1.0, 0.0, 4 * fine + 1), "rk4"))
    for nfe in (1, 2, 4):
        out = samplers.chain(flow_map, x1, solvers.uniform_grid(nfe), path)
        # at NFE 4 the chain takes exactly the reference's RK4 steps; fewer NFE take coarser ones
        tol = 1e-4 if nfe == 4 else 2e-2
        np.testing.assert_allclose(np.asarray(out), ref, atol=tol)


@pytest.mark.parametrize("kind", ["tcd", "ctm"])
def test_stochastic_chain_of_exact_map_keeps_the_data_distribution(kind):
    path = VPCosine()
    fm = gaussian_flow_map(path)
    n = 40_000
    k0, k1 = jax.random.split(jax.random.PRNGKey(2))
    grid = solvers.uniform_grid(4, t_start=0.999)
    std1 = float(jnp.sqrt(path.alpha(0.999) ** 2 * C * C + path.sigma(0.999) ** 2))
    x = std1 * jax.random.normal(k0, (n, 1))
    inj = jax.random.normal(k1, (3, n, 1))
    det = samplers.chain(fm, x, grid, path)
    np.testing.assert_allclose(np.asarray(det), np.asarray(x) * C / std1, rtol=1e-5, atol=1e-6)
    for gamma in (0.5, 1.0):
        out, traj = samplers.chain(fm, x, grid, path, gamma, inj, kind, return_trajectory=True)
        assert traj.shape == (5, n, 1)
        np.testing.assert_allclose(float(jnp.std(out)), C, rtol=2e-2)
        assert float(jnp.abs(out - det).mean()) > 0.1  # the injected noise was used


def _linear_student(path, form="semilinear"):
    def apply(params, x, t, s, label, guidance, num_steps, rngs, train):
        return jnp.tanh(x @ params["A"]) * (1.0 + t[:, None]) + params["b"]

    return Student(apply=apply, path=path, form=form, prediction="x0", uses_s=False)


def _params():
    r = np.random.default_rng(0)
    return {
        "A": jnp.asarray(r.standard_normal((3, 3)), jnp.float32),
        "b": jnp.asarray(r.standard_normal(3), jnp.float32),
    }


def test_gamma0_is_ddim_chain_and_gamma1_is_consistency_multistep():
    path = VPCosine()
    st, p = _linear_student(path), _params()
    noise = jax.random.normal(jax.random.PRNGKey(3), (8, 3))
    grid = solvers.uniform_grid(4)
    x_init = path.sigma(1.0) * noise
    ddim = solvers.solve(lambda x, t: st.velocity(p, x, t), x_init, grid, "ddim", path)
    np.testing.assert_allclose(
        np.asarray(samplers.sample(st, p, noise, grid)), np.asarray(ddim), rtol=1e-4, atol=1e-5
    )
    inj = jax.random.normal(jax.random.PRNGKey(4), (3, 8, 3))
    fm = samplers.student_flow_map(st, p)
    lcm = samplers.consistency_multistep(fm, x_init, grid, path, inj)
    tcd1 = samplers.sample(st, p, noise, grid, gamma=1.0, injected=inj)
    np.testing.assert_allclose(np.asarray(tcd1), np.asarray(lcm), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(tcd1 - ddim).max()) > 1e-2


def test_explicit_noise_determinism_and_errors():
    path = RectifiedFlow()
    st, p = _linear_student(path, "euler"), _params()
    noise = jax.random.normal(jax.random.PRNGKey(5), (4, 3))
    grid = solvers.uniform_grid(3)
    rng = jax.random.PRNGKey(6)
    run = jax.jit(lambda n, inj: samplers.sample(st, p, n, grid, gamma=0.3, injected=inj))
    inj = jax.random.normal(rng, (2, 4, 3))
    a, b = run(noise, inj), run(noise, inj)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(samplers.sample(st, p, noise, grid, gamma=0.3, rng=rng)), np.asarray(a)
    )
    assert float(jnp.abs(run(noise, inj + 1.0) - a).max()) > 1e-3
    with pytest.raises(ValueError, match="injected noise"):
        samplers.sample(st, p, noise, grid, gamma=0.3)
    with pytest.raises(ValueError, match="shape"):
        samplers.sample(st, p, noise, grid, gamma=0.3, injected=inj[:1])
    with pytest.raises(ValueError, match="gamma"):
        samplers.sample(st, p, noise, grid, gamma=1.5, injected=inj)
    # one step: no injected noise needed, gamma is irrelevant
    one = samplers.sample(st, p, noise, solvers.uniform_grid(1), gamma=0.7)
    np.testing.assert_allclose(np.asarray(one), np.asarray(st(p, noise, 1.0, 0.0)), rtol=1e-6)
