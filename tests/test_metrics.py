"""Closed-form checks of the evaluation metrics and the fixed feature spaces."""

from pathlib import Path

import numpy as np
import pytest

from fewstep_jax.metrics import features, sample_distances

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- flow map error ------------------------------------------------------------------------------


def test_flow_map_error_is_mean_squared_error():
    x = np.zeros((2, 2, 2))
    ref = np.zeros((2, 2, 2))
    ref[0, 0, 0] = 2.0  # one squared error of 4 among 8 entries
    assert sample_distances.flow_map_error(x, ref) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        sample_distances.flow_map_error(x, ref[:1])


# --- sliced Wasserstein ------------------------------------------------------------------------


def test_sw2_1d_gaussians_matches_exact_w2():
    # W2(N(m1, s1^2), N(m2, s2^2))^2 = (m1 - m2)^2 + (s1 - s2)^2; in 1-D SW2 is W2.
    rng = _rng(0)
    x = 0.5 + 1.0 * rng.standard_normal((40000, 1))
    y = -0.5 + 2.0 * rng.standard_normal((30000, 1))
    assert sample_distances.sliced_wasserstein2(x, y, num_projections=8) == pytest.approx(
        np.sqrt(2.0), abs=0.03
    )


def test_sw2_2d_isotropic_gaussians_matches_closed_form():
    # Per direction u: W2^2 = (u.dm)^2 + (s1 - s2)^2; E_u[(u.dm)^2] = |dm|^2 / D.
    rng = _rng(1)
    dm = np.array([2.0, -1.0])
    x = rng.standard_normal((10000, 2))
    y = dm + 0.5 * rng.standard_normal((10000, 2))
    expected = np.sqrt(np.sum(dm**2) / 2 + 0.25)
    got = sample_distances.sliced_wasserstein2(x, y, num_projections=1000)
    assert got == pytest.approx(expected, rel=0.03)


def test_sw2_unequal_counts_exact_small_case():
    # Quantile functions: x -> 0, 1, 2 on thirds; y -> 0, 3 on halves; W2^2 = 1/6 + 4/6 + 1/3.
    x = np.array([[2.0], [0.0], [1.0]])
    y = np.array([[3.0], [0.0]])
    assert sample_distances.sliced_wasserstein2(x, y, num_projections=3) == pytest.approx(np.sqrt(7 / 6))
    # A set and the same set with every point doubled are the same measure.
    assert sample_distances.sliced_wasserstein2(x, np.concatenate([x, x])) == pytest.approx(0.0, abs=1e-12)


def test_sw2_identical_sets_zero_and_deterministic():
    x = _rng(2).standard_normal((300, 5))
    assert sample_distances.sliced_wasserstein2(x, x[::-1]) == 0.0
    y = _rng(3).standard_normal((200, 5))
    assert sample_distances.sliced_wasserstein2(x, y) == sample_distances.sliced_wasserstein2(x, y)
    assert sample_distances.sliced_wasserstein2(x, y, seed=1) != sample_distances.sliced_wasserstein2(x, y)


def test_sw2_of_shift_is_projected_shift():
    # y = x + d keeps the order of every projection: W2^2(u) = (u.d)^2 exactly,
    # and for uniform directions E[(u.d)^2] = |d|^2 / D.
    d = np.linspace(-1.0, 2.0, 10)
    x = _rng(4).standard_normal((500, 2, 5))  # image-like, flattened to D = 10
    y = x + d.reshape(2, 5)
    p = 4000
    got = sample_distances.sliced_wasserstein2(x, y, num_projections=p, seed=7)
    u = sample_distances.random_directions(10, p, seed=7)
    assert got == pytest.approx(np.sqrt(np.mean((u @ d) ** 2)), rel=1e-9)
    assert got**2 == pytest.approx(np.sum(d**2) / 10, rel=0.06)


def test_sw2_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dimension"):
        sample_distances.sliced_wasserstein2(np.zeros((4, 2)), np.zeros((4, 3)))


# --- MMD and KID -------------------------------------------------------------------------------


def test_mmd_closed_form_is_unbiased():
    # x = y = {0, 1}, h = 1: U-statistic = 2 e^{-1/2} - 2 (1 + e^{-1/2}) / 2 = e^{-1/2} - 1.
    x = np.array([[0.0], [1.0]])
    assert sample_distances.mmd_rbf(x, x, bandwidths=[1.0]) == pytest.approx(np.exp(-0.5) - 1.0)
    # Two point masses: 1 + 1 - 2 e^{-1/2}.
    a, b = np.zeros((2, 1)), np.ones((2, 1))
    assert sample_distances.mmd_rbf(a, b, bandwidths=[1.0]) == pytest.approx(2 - 2 * np.exp(-0.5))


def test_mmd_same_vs_different_distribution():
    rng = _rng(5)
    x, y = rng.standard_normal((400, 3)), rng.standard_normal((400, 3))
    z = rng.standard_normal((400, 3)) + np.array([1.0, 0.0, 0.0])
    same, diff = sample_distances.mmd_rbf(x, y), sample_distances.mmd_rbf(x, z)
    assert abs(same) < 0.01
    assert diff > 0.1
    assert diff > 20 * abs(same)


def test_kid_same_vs_different_features():
    rng = _rng(6)
    fx, fy = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    fz = rng.standard_normal((600, 16)) * 1.5 + 0.5
    same, same_std = sample_distances.kid(fx, fy, num_subsets=20, subset_size=300)
    diff, _ = sample_distances.kid(fx, fz, num_subsets=20, subset_size=300)
    assert abs(same) < 0.05 and same_std > 0
    assert diff > 1.0
    assert sample_distances.kid(fx, fy, num_subsets=5) == sample_distances.kid(fx, fy, num_subsets=5)


# --- Frechet distance ---------------------------------------------------------------------------


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_closed_form(mu1, s1, mu2, s2) -> float:
    # tr((s1 s2)^{1/2}) = tr((s1^{1/2} s2 s1^{1/2})^{1/2}), by symmetric eigen-decompositions.
    r1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1)))


@pytest.mark.parametrize("rank", [6, 3])
def test_frechet_matches_closed_form(rank):
    rng = _rng(10 + rank)
    l1, l2 = rng.standard_normal((6, rank)), rng.standard_normal((6, 6))
    s1, s2 = l1 @ l1.T, l2 @ l2.T / 3
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = _frechet_closed_form(mu1, s1, mu2, s2)
    assert sample_distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-5)


def test_frechet_diagonal_and_self():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu = np.array([0.0, 1.0, 0.0])
    # Commuting covariances: sum (sqrt(a) - sqrt(b))^2 = 1 + 0 + 4, plus |mu|^2 = 1.
    assert sample_distances.frechet_distance(mu, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(6.0)
    # Singular covariances: (1 - 2)^2 + (0 - 1)^2 + 0.
    zero = np.zeros(3)
    got = sample_distances.frechet_distance(zero, np.diag([1.0, 0, 0]), zero, np.diag([4.0, 1, 0]))
    assert got == pytest.approx(2.0)
    feats = _rng(7).standard_normal((500, 4))
    mu_f, s_f = sample_distances.gaussian_stats(feats)
    np.testing.assert_allclose(s_f, np.cov(feats, rowvar=False))
    assert sample_distances.frechet_distance(mu_f, s_f, mu_f, s_f) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        sample_distances.frechet_distance(mu_f, s_f, mu_f[:3], s_f[:3, :3])


# --- straightness -------------------------------------------------------------------------------


def test_straightness_zero_for_constant_velocity_lines():
    rng = _rng(8)
    x1, x0 = rng.standard_normal((7, 3, 4)), rng.standard_normal((7, 3, 4))
    times = np.array([1.0, 0.93, 0.6, 0.55, 0.2, 0.0])  # non-uniform, from noise to data
    traj = x0[None] + times[:, None, None, None] * (x1 - x0)[None]
    assert sample_distances.straightness(traj, times) == pytest.approx(0.0, abs=1e-12)


def test_straightness_of_quadratic_path():
    # x(t) = a t^2 + b t: step velocity a (t_i + t_{i+1}) + b, mean velocity a + b, so on a uniform
    # N-step grid S = mean_b |a|^2 / dim * mean_i (2 m_i - 1)^2 = mean_b |a|^2 / dim * (1 - 1/N^2) / 3.
    rng = _rng(9)
    n, dim = 8, 5
    a, b = rng.standard_normal((4, dim)), rng.standard_normal((4, dim))
    times = np.linspace(1.0, 0.0, n + 1)
    traj = a[None] * times[:, None, None] ** 2 + b[None] * times[:, None, None]
    expected = np.mean(np.sum(a**2, axis=1)) / dim * (1 - 1 / n**2) / 3
    assert sample_distances.straightness(traj, times) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="times"):
        sample_distances.straightness(traj, times[:-1])


# --- PCA features --------------------------------------------------------------------------------


def test_pca_reconstructs_rank_k_data(tmp_path):
    rng = _rng(11)
    k = 5
    data = rng.standard_normal((200, k)) @ rng.standard_normal((k, 24)) + rng.standard_normal(24)
    data = data.reshape(200, 4, 6, 1)  # image-like input is flattened
    pca = features.PCAFeatures.fit(data, k=k)
    z = pca(data)
    assert z.shape == (200, k)
    np.testing.assert_allclose(pca.inverse(z), data.reshape(200, -1), atol=1e-4)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(k), atol=1e-5)
    assert np.all(np.diff(z.var(axis=0)) <= 0)  # largest variance first
    # One component fewer cannot reconstruct rank-k data.
    short = features.PCAFeatures.fit(data, k=k - 1)
    assert np.abs(short.inverse(short(data)) - data.reshape(200, -1)).max() > 0.1
    pca.save(tmp_path / "pca.npz")
    loaded = features.PCAFeatures.load(tmp_path / "pca.npz")
    np.testing.assert_array_equal(loaded.components, pca.components)
    np.testing.assert_array_equal(loaded(data), z)
    with pytest.raises(ValueError, match="fitted on 24"):
        pca(np.zeros((3, 25)))


# --- MNIST classifier ----------------------------------------------------------------------------


def test_shipped_classifier_accuracy_and_shapes():
    if not MNIST.is_file():
        pytest.skip(f"MNIST test digits not found at {MNIST}")
    _, meta = features.load_classifier()
    assert meta["test_accuracy"] > 0.98
    data = features.load_mnist(MNIST)
    x, y = data["x_test"][:400], data["y_test"][:400]
    logits = features.mnist_classifier_logits(x)
    assert logits.shape == (400, 10)
    assert np.mean(np.argmax(logits, axis=1) == y) > 0.97
    feats = features.mnist_features(x[:50, :, :, 0])  # (B, 28, 28) accepted too
    assert feats.shape == (50, 128)
    np.testing.assert_allclose(feats, features.mnist_features(x[:50]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(4, 32, 32, 1\)"):
        features.mnist_features(np.zeros((4, 32, 32, 1)))
