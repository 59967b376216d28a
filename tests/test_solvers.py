"""Teacher ODE solvers: convergence orders, DDIM == Euler on RF, time grids, adaptive reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax import solvers
from fewstep_jax.paths import DDPM, get_path
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params


def _smooth_teacher(path_name):
    ang = np.arange(8) * 2 * np.pi / 8
    means = np.stack([np.cos(ang), np.sin(ang)], 1)
    params = gmm_params(means, np.tile(np.eye(2) * 0.25, (8, 1, 1)), np.ones(8))
    return gaussian_mixture_teacher(params, get_path(path_name))


@pytest.fixture(scope="module")
def rf_case():
    teacher = _smooth_teacher("rf")
    x = jax.random.normal(jax.random.PRNGKey(0), (256, 2))
    ref, _ = jax.jit(lambda x: solvers.solve_adaptive(teacher.velocity_fn(), x, rtol=1e-7, atol=1e-7))(x)
    return teacher, x, ref


def _errors(teacher, x, ref, method, steps):
    out = []
    for n in steps:
        y = teacher.solve(x, solvers.uniform_grid(n), method)
        out.append(float(jnp.sqrt(jnp.mean((y - ref) ** 2))))
    return np.array(out)


@pytest.mark.parametrize(
    "method,order,steps",
    [("euler", 1, (8, 16, 32)), ("heun", 2, (8, 16, 32)), ("rk4", 4, (4, 8, 16))],
)
def test_convergence_order(rf_case, method, order, steps):
    """log-log slope of the flow-map error against the number of steps."""
    teacher, x, ref = rf_case
    err = _errors(teacher, x, ref, method, steps)
    slope = -np.polyfit(np.log(steps), np.log(err), 1)[0]
    assert order - 0.35 < slope < order + 0.6, (method, slope, err)


def test_ddim_equals_euler_on_rectified_flow(rf_case):
    teacher, x, _ = rf_case
    for n in (1, 3, 8):
        g = solvers.uniform_grid(n)
        np.testing.assert_allclose(teacher.solve(x, g, "ddim"), teacher.solve(x, g, "euler"), atol=2e-5)


def test_exponential_integrators_on_vp():
    """DPM-Solver++(2M) beats DDIM, and DDIM beats Euler at few steps on a VP teacher."""
    teacher = _smooth_teacher("vp_cosine")
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 2))
    ref, _ = solvers.solve_adaptive(teacher.velocity_fn(), x, rtol=1e-7, atol=1e-7)
    e_ddim = _errors(teacher, x, ref, "ddim", (8, 16))
    e_2m = _errors(teacher, x, ref, "dpmpp_2m", (8, 16))
    assert np.all(e_2m < 0.5 * e_ddim), (e_2m, e_ddim)
    assert -np.polyfit(np.log([8, 16]), np.log(e_ddim), 1)[0] > 0.8


def test_adaptive_matches_fine_rk4(rf_case):
    teacher, x, ref = rf_case
    fine = teacher.solve(x, solvers.uniform_grid(256), "rk4")
    assert float(jnp.max(jnp.abs(fine - ref))) < 1e-4


def test_trajectory_and_reverse_direction(rf_case):
    teacher, x, _ = rf_case
    y, traj = teacher.solve(x, solvers.uniform_grid(16), "heun", return_trajectory=True)
    assert traj.shape == (17, *x.shape)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[-1], y)
    # integrating back from data to noise recovers the noise (invertible flow)
    back = teacher.solve(y, solvers.uniform_grid(64, 0.0, 1.0), "rk4")
    np.testing.assert_allclose(back, x, atol=1e-2)


def test_grids():
    g = solvers.uniform_grid(4)
    np.testing.assert_allclose(g, [1.0, 0.75, 0.5, 0.25, 0.0])
    rf = get_path("rf")
    e = solvers.edm_grid(18, rf)
    assert e.shape == (19,) and e[0] == 1.0 and e[-1] == 0.0 and np.all(np.diff(e) < 0)
    sig = e[1:-1] / (1 - e[1:-1])  # RF: sigma = t / (1 - t); rho-spacing in sigma^(1/7)
    np.testing.assert_allclose(
        np.diff(sig[:].astype(np.float64) ** (1 / 7))[1:], np.diff(sig ** (1 / 7))[1], rtol=1e-3
    )
    assert abs(sig[-1] - 0.002) < 1e-5
    # strictly decreasing on every path, also where t = 1 is not pure noise (DDPM caps sigma_max)
    for name in ("rf", "vp_cosine", "vp_linear", "ddpm", "ve"):
        g = solvers.edm_grid(18, get_path(name))
        assert g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0), name
    # diffusers DDIMScheduler leading spacing
    np.testing.assert_array_equal(solvers.ddpm_leading_timesteps(4), [750, 500, 250, 0])
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="leading")
    sched.set_timesteps(10)
    np.testing.assert_array_equal(solvers.ddpm_leading_timesteps(10), sched.timesteps.numpy())
    d = solvers.ddpm_leading_grid(4, DDPM())
    np.testing.assert_allclose(d, [0.751, 0.501, 0.251, 0.001, 0.0], atol=1e-6)


def test_bad_inputs():
    teacher = _smooth_teacher("rf")
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.solve(teacher.velocity_fn(), x, solvers.uniform_grid(2), "rk45")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solvers.solve(teacher.velocity_fn(), x, np.array([1.5, 0.0]), "euler")
    with pytest.raises(ValueError, match="num_steps"):
        solvers.uniform_grid(0)
    with pytest.raises(ValueError, match="needs the teacher's path"):
        solvers.solve(teacher.velocity_fn(), x, solvers.uniform_grid(2), "ddim")
