"""Sample-quality and trajectory metrics of the exact testbeds.

Host-side functions (numpy, float64 internally) for the edges of a run, never inside a jitted
training step. They accept numpy or jax arrays and return Python floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Multiples of the median pairwise distance used as RBF bandwidths by `mmd_rbf`.
MMD_BANDWIDTH_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# Pooled points used for the median heuristic (a fixed random subset beyond this).
_MEDIAN_MAX_POINTS = 2000


def _as_2d(x: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """(B, ...) -> float64 (B, D)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must have shape (B, ...) with B >= {min_rows}, got {x.shape}")
    return x.reshape(x.shape[0], -1)


def _same_dim(x: np.ndarray, y: np.ndarray, nx: str, ny: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{nx} and {ny} differ in dimension: {x.shape} vs {y.shape}")


def flow_map_error(x: Any, x_ref: Any) -> float:
    """Mean over samples of the per-dimension mean squared error; x, x_ref (B, ...)."""
    x, x_ref = np.asarray(x, np.float64), np.asarray(x_ref, np.float64)
    if x.shape != x_ref.shape or x.ndim < 1 or x.size == 0:
        raise ValueError(f"x and x_ref must have the same non-empty shape, got {x.shape}, {x_ref.shape}")
    return float(np.mean((x - x_ref) ** 2))


def random_directions(dim: int, num: int, seed: int = 0) -> np.ndarray:
    """(num, dim) unit vectors, uniform on the sphere, fixed by the seed."""
    u = np.random.default_rng(seed).standard_normal((num, dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _w2_squared_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact W2^2 between empirical measures per column: a (n, P), b (m, P) -> (P,).

    W2^2 = int_0^1 (F_a^-1(u) - F_b^-1(u))^2 du. Both quantile functions are step functions with
    jumps at i/n and j/m, so the integral is a finite sum over the merged breakpoints.
    """
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    n, m = len(a), len(b)
    if n == m:
        return np.mean((a - b) ** 2, axis=0)
    cuts = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(cuts, prepend=0.0)
    mid = cuts - widths / 2
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return widths @ (a[ia] - b[ib]) ** 2


def sliced_wasserstein2(x: Any, y: Any, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between sample sets x (n, ...) and y (m, ...).

    SW2 = sqrt(mean_u W2^2(u.x, u.y)) over `num_projections` unit directions u drawn by
    `random_directions(D, num_projections, seed)` (deterministic). The 1-D W2^2 are exact for the
    empirical measures, also when n != m (quantile functions matched on merged breakpoints).
    Images are flattened. For D = 1 this is the exact W2.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    _same_dim(x, y, "x", "y")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    u = random_directions(x.shape[1], num_projections, seed)
    # Chunks of directions bound the memory of the (n + m, chunk) quantile gathers.
    w2 = [_w2_squared_1d(x @ c.T, y @ c.T) for c in np.array_split(u, -(-len(u) // 64))]
    return float(np.sqrt(np.mean(np.concatenate(w2))))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased squared MMD (U-statistic: diagonals of kxx, kyy excluded) from kernel matrices."""
    n, m = len(kxx), len(kyy)
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def median_heuristic(x: Any, y: Any, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of the pooled sample (<= 2000 points, fixed subset)."""
    z = np.concatenate([_as_2d(x, "x"), _as_2d(y, "y")])
    if len(z) > _MEDIAN_MAX_POINTS:
        z = z[np.random.default_rng(seed).choice(len(z), _MEDIAN_MAX_POINTS, replace=False)]
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    return float(np.median(d))


def mmd_rbf(x: Any, y: Any, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased squared MMD between x (n, ...) and y (m, ...) with a sum of RBF kernels.

    k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2)). Default bandwidths: `MMD_BANDWIDTH_MULTIPLES`
    times the median pairwise distance of the pooled sample (`median_heuristic`). The estimate is
    unbiased, so it can be slightly negative when x and y share a distribution. n, m >= 2.
    """
    x, y = _as_2d(x, "x", 2), _as_2d(y, "y", 2)
    _same_dim(x, y, "x", "y")
    if bandwidths is None:
        med = median_heuristic(x, y)
        if med <= 0:
            raise ValueError("median pairwise distance is 0 (all points equal); give bandwidths")
        bandwidths = [c * med for c in MMD_BANDWIDTH_MULTIPLES]
    hs = np.asarray(bandwidths, np.float64)
    if hs.ndim != 1 or len(hs) == 0 or np.any(hs <= 0):
        raise ValueError(f"bandwidths must be a non-empty list of positive floats, got {bandwidths}")

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = _sq_dists(a, b)
        return sum(np.exp(-d / (2.0 * h * h)) for h in hs)

    return _mmd2_unbiased(kernel(x, x), kernel(y, y), kernel(x, y))


def kid(
    features_x: Any,
    features_y: Any,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance style score; returns (mean, std) over subsets.

    Unbiased squared MMD with the cubic polynomial kernel k(a, b) = (a.b / F + 1)^3 on features
    (n, F) and (m, F), averaged over `num_subsets` pairs of random subsets (without replacement,
    size min(subset_size, n, m), fixed by the seed). Not scaled (multiply by 1e3 for the usual
    "KID x 1e3"). The cubic kernel makes it sensitive to the features' scale: it is calibrated
    for O(1) features such as Inception's pool features.
    """
    fx, fy = _as_2d(features_x, "features_x", 2), _as_2d(features_y, "features_y", 2)
    _same_dim(fx, fy, "features_x", "features_y")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, len(fx), len(fy))
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    dim = fx.shape[1]
    kernel = lambda a, b: (a @ b.T / dim + 1.0) ** 3
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        a = fx[rng.choice(len(fx), size, replace=False)]
        b = fy[rng.choice(len(fy), size, replace=False)]
        vals.append(_mmd2_unbiased(kernel(a, a), kernel(b, b), kernel(a, b)))
    return float(np.mean(vals)), float(np.std(vals))


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (B, F), B >= 2, in float64."""
    f = _as_2d(features, "features", 2)
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), returned squared (d^2):

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

    The trace of the matrix square root is computed without ``scipy.linalg.sqrtm``:
    sigma1 sigma2 is similar to the symmetric PSD matrix M = sigma1^{1/2} sigma2 sigma1^{1/2}, so
    tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i(M)). Two symmetric eigendecompositions are exact
    for singular covariances, need no eps offset, never go complex, and take seconds at F = 2048
    where sqrtm takes minutes. Round-off negative eigenvalues are clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"expected mu (F,) and sigma (F, F) with one F, got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    if not (
        np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()
    ):
        raise ValueError("frechet_distance got non-finite statistics")
    lam1, u1 = np.linalg.eigh(0.5 * (s1 + s1.T))
    root1 = (u1 * np.sqrt(np.clip(lam1, 0.0, None))) @ u1.T
    m = root1 @ (0.5 * (s2 + s2.T)) @ root1
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None))))
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))


def straightness(trajectory: Any, times: Any) -> float:
    """Straightness of discretised ODE trajectories (docs/methods.md §5.1, normalised per dimension).

    trajectory (N+1, B, ...) holds x at times (N+1,) (e.g. from t = 1 down to t = 0), N >= 1.
    With the mean velocity v = (x_N - x_0) / (t_N - t_0) and the step velocities
    v_i = (x_{i+1} - x_i) / (t_{i+1} - t_i),

        S = sum_i |t_{i+1} - t_i| * mean_b ||v - v_i||^2 / dim  /  |t_N - t_0|,

    dim the size of one sample: the time-average of the per-dimension squared deviation of the
    velocity from the straight one. S = 0 exactly iff every trajectory is a line run at constant
    speed (as Euler steps of a rectified flow are), regardless of the time grid's direction.
    """
    x = np.asarray(trajectory, np.float64)
    t = np.asarray(times, np.float64)
    if x.ndim < 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"trajectory must have shape (N+1, B, ...) with N >= 1, got {x.shape}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"times must have shape ({x.shape[0]},) to match trajectory, got {t.shape}")
    dt = np.diff(t)
    if np.any(dt == 0):
        raise ValueError(f"times must not repeat, got {t}")
    x = x.reshape(x.shape[0], x.shape[1], -1)
    total = t[-1] - t[0]
    v_mean = (x[-1] - x[0]) / total
    v_steps = np.diff(x, axis=0) / dt[:, None, None]
    dev = np.mean(np.sum((v_mean - v_steps) ** 2, axis=-1), axis=1) / x.shape[-1]
    return float(np.sum(np.abs(dt) * dev) / abs(total))
