"""Time grids, jump sampling and per-sample teacher jumps of the grid-based trajectory terms
(TraFlow, CTM, CD; docs/methods.md §2.3).

* :func:`time_grid` / :func:`sample_grid_times`: CTM-style discrete times ``s <= r < t`` on a grid
  ``0 = t_0 < ... < t_N = 1``: ``t = t_n``, ``r = t_{n-k}``, ``s = t_m`` with ``m ~ U{0..n-k}``; the
  jump ``k`` and start ``n`` by CTM's sampler (``"ctm"``: one ``k ~ p(k)`` on ``{1..K}`` per batch,
  then ``n ~ U{k..N}``, as ``sony/ctm``) or the start-first variant (``"start_first"``:
  ``n ~ U{1..N}``, then ``k ~ p(k)`` on ``{1..min(n, K)}`` per sample).
* :func:`teacher_jump`: a per-sample teacher solve ``t -> r`` over the ``k`` grid intervals of the
  jump (each split into ``substeps`` equal steps), vectorised by running ``max_jump * substeps``
  steps whose times are clamped at ``r``: padded steps have zero length and are exact identities
  of Euler / Heun, so no masking is needed (the cost is that of the longest jump). A step that
  ends at t = 0 follows the solvers' rule for the last stage into the data
  (:func:`fewstep_jax.solvers.into_data_is_euler`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.paths import Path
from fewstep_jax.teachers.base import Teacher

Array = jax.Array

JUMP_WEIGHTINGS = ("linear", "uniform")
JUMP_SAMPLERS = ("ctm", "start_first")
JUMP_SOLVERS = ("euler", "heun")


def time_grid(kind: str, num_steps: int, path: Path) -> np.ndarray:
    """Ascending grid ``0 = t_0 < ... < t_N = 1`` (N + 1,): ``uniform`` or ``edm`` (rho = 7)."""
    if kind not in ("uniform", "edm"):
        raise ValueError(f"trajectory time grid must be 'uniform' or 'edm', got {kind!r}")
    g = np.ascontiguousarray(solvers.make_grid(kind, int(num_steps), path)[::-1])
    if not (g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)):
        raise ValueError(f"the {kind} grid with {num_steps} steps is not strictly increasing on [0, 1]: {g}")
    return g


class GridTimes(NamedTuple):
    """Per-sample indices and times, each (B,): ``s = t_m <= r = t_{n-k} < t = t_n``."""

    n: Array
    k: Array
    m: Array
    t: Array
    r: Array
    s: Array


def sample_grid_times(
    rng: Array,
    grid: Array | np.ndarray,
    batch: int,
    max_jump: int,
    weighting: str = "linear",
    sampler: str = "ctm",
) -> GridTimes:
    """Grid times ``s <= r < t`` with jump weights ``p(k) ∝ k`` (``linear``) or flat (``uniform``):

    * ``sampler="ctm"`` (``sony/ctm``'s ``get_num_heun_step`` then ``sample_t``): one jump length
      ``k ~ p(k)`` on ``{1..K}`` for the whole batch, then per sample the start ``n ~ U{k..N}``;
    * ``"start_first"`` (this project's earlier sampler, kept as a labelled variant): per sample
      ``n ~ U{1..N}``, then ``k ~ p(k)`` on ``{1..min(n, K)}``; far fewer long jumps (at
      N = K = 8, linear: mean jump 10/3 against CTM's 17/3, the full jump 8x rarer);

    and ``m ~ U{0..n-k}``; jit-able, vectorised over the batch."""
    if weighting not in JUMP_WEIGHTINGS:
        raise ValueError(f"jump weighting must be one of {JUMP_WEIGHTINGS}, got {weighting!r}")
    if sampler not in JUMP_SAMPLERS:
        raise ValueError(f"jump sampler must be one of {JUMP_SAMPLERS}, got {sampler!r}")
    if int(max_jump) < 1:
        raise ValueError(f"max_jump must be >= 1, got {max_jump}")
    grid = jnp.asarray(grid, jnp.float32)
    N = grid.shape[0] - 1
    K = min(int(max_jump), N)
    kn, kk, km = jax.random.split(rng, 3)
    ks = jnp.arange(1, K + 1)
    logw = jnp.log(ks.astype(jnp.float32)) if weighting == "linear" else jnp.zeros((K,), jnp.float32)
    if sampler == "ctm":
        k = jnp.full((batch,), jax.random.categorical(kk, logw) + 1)
        # n ~ U{k..N}: the starts from which a jump of k grid intervals fits
        u = jax.random.uniform(kn, (batch,))
        n = jnp.minimum(k + jnp.floor(u * (N - k + 1)).astype(k.dtype), N)
    else:
        n = jax.random.randint(kn, (batch,), 1, N + 1)
        logits = jnp.where(ks[None, :] <= jnp.minimum(n, K)[:, None], logw[None, :], -jnp.inf)
        k = jax.random.categorical(kk, logits, axis=-1) + 1
    hi = n - k  # m ~ U{0..hi}
    m = jnp.minimum(jnp.floor(jax.random.uniform(km, (batch,)) * (hi + 1)).astype(jnp.int32), hi)
    return GridTimes(n, k, m, grid[n], grid[n - k], grid[m])


def solve_per_sample(
    velocity, x: Array, times: Array, method: str = "heun", euler_into_data: bool = False
) -> Array:
    """Integrates along per-sample time rows ``times`` (B, M + 1) with M Euler / Heun steps; with
    ``euler_into_data`` a Heun step ending at t = 0 is Euler (``solvers.into_data_is_euler``)."""
    if method not in JUMP_SOLVERS:
        raise ValueError(f"per-sample solver must be one of {JUMP_SOLVERS}, got {method!r}")

    def body(xc, ts):
        return solvers.per_sample_step(velocity, xc, ts[0], ts[1], method, euler_into_data), None

    pairs = jnp.stack([times[:, :-1].T, times[:, 1:].T], axis=1)  # (M, 2, B)
    x_end, _ = jax.lax.scan(body, x, pairs)
    return x_end


def jump_times(grid: Array, n: Array, k: Array, max_jump: int, substeps: int = 1) -> Array:
    """Per-sample times (B, max_jump * substeps + 1) from ``t_n`` down the grid to ``t_{n-k}``,
    each interval split into ``substeps`` equal steps; entries past ``t_{n-k}`` repeat it."""
    grid = jnp.asarray(grid, jnp.float32)
    j = jnp.arange(max_jump)
    lo_idx = (n - k)[:, None]
    hi = grid[jnp.maximum(n[:, None] - j[None], lo_idx)]  # (B, K)
    lo = grid[jnp.maximum(n[:, None] - j[None] - 1, lo_idx)]
    frac = jnp.arange(substeps, dtype=jnp.float32) / substeps
    inner = hi[:, :, None] + (lo - hi)[:, :, None] * frac[None, None, :]  # (B, K, S)
    times = inner.reshape(n.shape[0], max_jump * substeps)
    return jnp.concatenate([times, grid[n - k][:, None]], axis=1)


def teacher_jump(
    teacher: Teacher,
    x: Array,
    grid: Array,
    n: Array,
    k: Array,
    max_jump: int,
    method: str = "heun",
    substeps: int = 1,
    label: Array | None = None,
    guidance: float = 1.0,
    euler_into_data: bool | str = "auto",
) -> Array:
    """``sg[Phi_teacher(x, t_n -> t_{n-k})]`` with ``k * substeps`` steps per sample (B, ...).

    ``euler_into_data``: ``"auto"`` (the teacher's :attr:`~fewstep_jax.teachers.base.Teacher.euler_into_data`,
    as the evaluation's solvers), or a bool: the last Heun step of a jump that ends at t = 0 is
    Euler on a teacher singular at the data (docs/methods.md pitfall 23).
    Cost: ``max_jump * substeps`` steps (x2 NFE for Heun) for every sample, whatever its ``k``.
    """
    times = jump_times(grid, n, k, max_jump, substeps)
    velocity = lambda xx, tt: teacher.velocity(xx, tt, label, guidance)
    into = teacher.euler_into_data_by(euler_into_data)
    return jax.lax.stop_gradient(solve_per_sample(velocity, x, times, method, into))


__all__ = [
    "JUMP_SAMPLERS",
    "JUMP_SOLVERS",
    "JUMP_WEIGHTINGS",
    "GridTimes",
    "jump_times",
    "sample_grid_times",
    "solve_per_sample",
    "teacher_jump",
    "time_grid",
]
