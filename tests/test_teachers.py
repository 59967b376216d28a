"""Analytic teachers: exact velocities (against Monte Carlo and closed forms), guidance, inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax.paths import get_path
from fewstep_jax.teachers.analytic import (
    gaussian_mixture_teacher,
    gmm_params,
    gmm_sample,
    ideal_denoiser_teacher,
)
from fewstep_jax.testbeds.base import Testbed
from fewstep_jax.testbeds.exact import checker_params, make_testbed, reference_flow_map


def _mc_velocity(params, path, x_t, t, n=400_000, seed=0):
    """Self-normalised importance estimate of E[alpha' x0 + sigma' eps | x_t] and its std error."""
    x0, _ = gmm_sample(params, np.random.default_rng(seed), n)
    a, s, da, ds = (float(v) for v in path.derivatives(jnp.asarray(t)))
    x0 = x0.astype(np.float64)
    logw = -0.5 * np.sum((x_t - a * x0) ** 2, axis=1) / s**2
    w = np.exp(logw - logw.max())
    w /= w.sum()
    eps = (x_t - a * x0) / s
    v = da * x0 + ds * eps
    mean = w @ v
    ess = 1.0 / np.sum(w**2)
    se = np.sqrt(w @ (v - mean) ** 2 / ess)
    return mean, se


@pytest.mark.parametrize("path_name", ["rf", "vp_cosine"])
def test_mixture_velocity_matches_monte_carlo(path_name):
    params = checker_params()
    path = get_path(path_name)
    teacher = gaussian_mixture_teacher(params, path, conditional=False)
    for t, x_t in [(0.3, [0.4, -0.9]), (0.6, [-0.2, 0.5]), (0.9, [1.1, 0.3])]:
        x_t = np.array(x_t)
        v = np.asarray(teacher.velocity(jnp.asarray(x_t[None], jnp.float32), jnp.array([t])))[0]
        mc, se = _mc_velocity(params, path, x_t, t)
        assert np.all(np.abs(v - mc) < 5 * se + 2e-3), (t, v, mc, se)


def test_single_gaussian_closed_form_and_conditioning():
    """Label k restricts the mixture to component k: a Gaussian with a closed-form velocity."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((3, 2))
    covs = np.array([[[0.5, 0.2], [0.2, 0.3]], [[0.2, 0.0], [0.0, 0.1]], [[0.3, -0.1], [-0.1, 0.4]]])
    params = gmm_params(means, covs, [0.2, 0.3, 0.5])
    teacher = gaussian_mixture_teacher(params, get_path("rf"))
    x = rng.standard_normal((5, 2))
    t = np.array([0.1, 0.3, 0.5, 0.7, 0.95])
    for k in range(3):
        v = np.asarray(teacher.velocity(jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.full((5,), k)))
        for i in range(5):
            a, s = 1 - t[i], t[i]
            cx = a * a * covs[k] + s * s * np.eye(2)
            x0 = means[k] + a * covs[k] @ np.linalg.solve(cx, x[i] - a * means[k])
            eps = s * np.linalg.solve(cx, x[i] - a * means[k])
            np.testing.assert_allclose(v[i], eps - x0, atol=2e-5)


def test_classifier_free_guidance_is_linear_in_scale():
    teacher = gaussian_mixture_teacher(checker_params(), get_path("rf"))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
    t = jnp.full((6,), 0.5)
    lab = jnp.arange(6) % 8
    v_c = teacher.velocity(x, t, lab)
    v_u = teacher.velocity(x, t, jnp.full((6,), -1))
    np.testing.assert_allclose(teacher.velocity(x, t, None), v_u, atol=1e-6)
    np.testing.assert_allclose(teacher.velocity(x, t, lab, guidance=0.0), v_u, atol=1e-6)
    np.testing.assert_allclose(teacher.velocity(x, t, lab, guidance=3.0), v_u + 3 * (v_c - v_u), atol=1e-5)
    assert float(jnp.max(jnp.abs(v_c - v_u))) > 1e-2


def test_ideal_denoiser_matches_bruteforce():
    rng = np.random.default_rng(1)
    data = rng.uniform(-1, 1, (50, 4, 4, 1)).astype(np.float32)
    labels = np.arange(50) % 5
    path = get_path("vp_cosine")
    teacher = ideal_denoiser_teacher(data, path, labels=labels)
    x = rng.standard_normal((3, 4, 4, 1)).astype(np.float32)
    t = np.array([0.2, 0.5, 0.8], np.float32)
    lab = np.array([-1, 2, 4])
    x0, eps = teacher.x0_eps(jnp.asarray(x), jnp.asarray(t), jnp.asarray(lab))
    d = data.reshape(50, -1).astype(np.float64)
    for i in range(3):
        a, s = np.cos(np.pi * t[i] / 2), np.sin(np.pi * t[i] / 2)
        keep = np.ones(50, bool) if lab[i] < 0 else labels == lab[i]
        logit = -np.sum((x[i].reshape(-1) - a * d) ** 2, 1) / (2 * s * s)
        logit[~keep] = -np.inf
        w = np.exp(logit - logit.max())
        ref_x0 = (w / w.sum()) @ d
        np.testing.assert_allclose(np.asarray(x0[i]).reshape(-1), ref_x0, atol=1e-4)
        np.testing.assert_allclose(
            np.asarray(eps[i]).reshape(-1), (x[i].reshape(-1) - a * ref_x0) / s, atol=1e-3
        )


def test_mixture_sampler_moments():
    params = gmm_params([[0.0, 0.0], [3.0, 1.0]], [np.eye(2) * 0.5, np.diag([0.2, 0.1])], [0.25, 0.75])
    x, lab = gmm_sample(params, np.random.default_rng(0), 200_000)
    np.testing.assert_allclose(x.mean(0), [2.25, 0.75], atol=0.02)
    assert abs((lab == 1).mean() - 0.75) < 0.005


def test_reference_flow_map_lands_on_the_data():
    tb = make_testbed("gmm8", num_reference=4000)
    x1 = np.asarray(tb.teacher.prior(jax.random.PRNGKey(0), 1000))
    x0, nfe = reference_flow_map(tb.teacher, x1)
    assert nfe > 20
    # every sample lands near one of the 8 modes (radius 2, std 0.1)
    r = np.linalg.norm(x0, axis=1)
    assert np.mean(np.abs(r - 2.0) < 0.4) > 0.99
    d = tb.distances(x0)
    # as close as fresh exact samples of the same size (the finite-sample floor of SW2)
    fresh = [tb.sample_data(np.random.default_rng(s), 1000)["x"] for s in range(3)]
    floor = np.mean([tb.distances(x)["sw2"] for x in fresh])
    assert d["sw2"] < 2 * floor, (d, floor)
    # while one Euler step collapses the samples towards the origin and is far
    x_euler = np.asarray(tb.teacher.solve(jnp.asarray(x1), np.array([1.0, 0.0]), "euler"))
    assert tb.distances(x_euler)["sw2"] > 5 * d["sw2"]


def test_bad_input_shapes_and_times():
    tb = make_testbed("gmm8", num_reference=100)
    with pytest.raises(ValueError, match="expects samples of shape"):
        tb.teacher.check_input(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tb.teacher.check_input(np.zeros((4, 2)), np.array([1.2]))
    with pytest.raises(ValueError, match="unknown testbed"):
        make_testbed("cifar")
    with pytest.raises(ValueError, match="positive definite"):
        gmm_params([[0.0]], [[[-1.0]]], [1.0])
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        make_testbed("mnist", mnist_path="/nonexistent/missing.npz")


def test_unconditional_teacher_rejects_guidance():
    teacher = ideal_denoiser_teacher(np.zeros((3, 2), np.float32), get_path("rf"))
    with pytest.raises(ValueError, match="unconditional"):
        teacher.velocity(jnp.zeros((2, 2)), jnp.full((2,), 0.5), None, guidance=2.0)


def test_exact_testbed_interface_and_training_batches(tmp_path):
    """An exact testbed is a Testbed with its analytic teacher; a mixture trains on fresh exact draws
    (a pure function of (seed, step)); mnist on its whole training split, not only the ``subset``
    its ideal denoiser holds."""
    tb = make_testbed("gmm8", num_reference=100)
    assert isinstance(tb, Testbed) and tb.has_exact_teacher and tb.exact_teacher is tb.teacher
    assert tb.path is tb.teacher.path and tb.data_shape == (2,) and not tb.is_image
    batch = tb.source(True, 256, 0, 0, 1).batch(3)
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["x"], tb.source(False, 256, 0, 0, 1).batch(3)["x"])
    assert "label" not in tb.source(False, 256, 0, 0, 1).batch(3)
    assert np.mean(np.abs(np.linalg.norm(batch["x"], axis=1) - 2.0) < 0.4) > 0.99  # on the 8 modes
    # 40 MNIST-shaped images, image i filled with the pixel value 5 i: its index is readable
    n = 40
    images = np.repeat(5 * np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=np.arange(n) % 10)
    tb = make_testbed("mnist", mnist_path=str(tmp_path / "mnist.npz"), subset=8, pca_dim=4)
    assert tb.is_image and tb.data_shape == (28, 28, 1) and len(tb.reference["x"]) == 8
    x = tb.source(False, 64, 0, 0, 1).batch(0)["x"]
    index = np.rint((x[:, 0, 0, 0] + 1) / 2 * 255 / 5).astype(int)
    assert index.max() >= 8 and set(index) <= set(range(n))
