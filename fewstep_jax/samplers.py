"""Few-step samplers shared by every method: chains of a flow map ``G(x, t, s)`` on a time grid.

A chain visits ``grid = (t_0 > t_1 > ... > t_N)``; step i jumps with ``G`` from ``t_i`` to an
intermediate time ``s'_i <= t_{i+1}`` and forward-diffuses back up to ``t_{i+1}`` with fresh noise
``z_i`` (exactly the marginal of the path, docs/design.md "Student"):

    x_{t'} = (alpha_{t'} / alpha_{s'}) x_{s'} + sqrt(sigma_{t'}^2 - (alpha_{t'} sigma_{s'} / alpha_{s'})^2) z

The last step jumps straight to ``t_N`` with no noise. Two parameterisations of the stochasticity
``gamma in [0, 1]``:

* ``"tcd"`` (docs/methods.md §3.3, strategic stochastic sampling): ``s' = (1 - gamma) t_{i+1}``.
  gamma = 0: the deterministic chain of ``G``; gamma = 1: multistep consistency / LCM sampling
  (jump to data, re-noise to ``t_{i+1}``).
* ``"ctm"`` (docs/methods.md §5.4, gamma-sampling): in EDM noise levels ``sigma = sigma_t / alpha_t``,
  ``sigma(s') = sqrt(1 - gamma^2) (sigma(t_{i+1}) - sigma_min) + sigma_min``.

Everything random is an argument: the initial noise and the injected noises ``(N - 1, B, ...)``,
so a run can be replayed step by step against another implementation. ``rng`` is a convenience
that draws the injected noise when it is not given.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import Path, bcast, edm_sigma, t_from_edm_sigma
from fewstep_jax.students import Student

Array = jax.Array
FlowMap = Callable[[Array, Array, Array], Array]
GAMMA_KINDS = ("tcd", "ctm")


def student_flow_map(student: Student, params, **kw) -> FlowMap:
    """``(x, t (B,), s (B,)) -> G(x, t, s)`` with the student's condition (label, guidance, ...) bound."""
    return lambda x, t, s: student(params, x, t, s, **kw)


def intermediate_time(
    path: Path, t_next: Array, gamma: float | Array, kind: str = "tcd", sigma_min: float = 0.002
) -> Array:
    """The time ``s' <= t_next`` a stochastic step jumps to before re-noising to ``t_next``."""
    t_next = jnp.asarray(t_next, jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    if kind == "tcd":
        return (1.0 - gamma) * t_next
    if kind == "ctm":
        sig = edm_sigma(path, t_next)
        sig_s = jnp.sqrt(1.0 - gamma**2) * (sig - sigma_min) + sigma_min
        s = t_from_edm_sigma(path, sig_s)
        # gamma = 0 or a level already below sigma_min: no re-noising, and no round-trip error
        keep = (gamma == 0.0) | (sig <= sigma_min)
        return jnp.where(keep, t_next, jnp.minimum(s, t_next))
    raise ValueError(f"unknown gamma parameterisation {kind!r}; expected one of {GAMMA_KINDS}")


def forward_diffuse(path: Path, x_s: Array, s: Array, t: Array, z: Array) -> Array:
    """Samples ``x_t | x_s`` of the path's forward process, ``s <= t`` (s, t scalars or (B,)).

    ``x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s/alpha_s)^2) z``: if
    ``x_s ~ alpha_s x0 + sigma_s eps`` then ``x_t ~ alpha_t x0 + sigma_t eps'``.
    """
    a_s, s_s = path.alpha_sigma(s)
    a_t, s_t = path.alpha_sigma(t)
    r = a_t / a_s
    var = jnp.maximum(s_t**2 - (r * s_s) ** 2, 0.0)
    return bcast(r, x_s) * x_s + bcast(jnp.sqrt(var), x_s) * z


def _check_gamma(gamma, kind: str) -> None:
    if kind not in GAMMA_KINDS:
        raise ValueError(f"unknown gamma parameterisation {kind!r}; expected one of {GAMMA_KINDS}")
    if not isinstance(gamma, jax.core.Tracer) and not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")


def chain(
    flow_map: FlowMap,
    x: Array,
    grid,
    path: Path,
    gamma: float | Array = 0.0,
    injected: Array | None = None,
    kind: str = "tcd",
    sigma_min: float = 0.002,
    return_trajectory: bool = False,
):
    """Runs a flow-map chain on ``grid`` from the state ``x`` at ``grid[0]``.

    Args:
      flow_map: ``(x, t (B,), s (B,)) -> x_s``.
      x: (B, ...) state at ``grid[0]``.
      grid: (N + 1,) decreasing times; N = number of jumps = NFE of a one-call flow map.
      path: the interpolation path (for the re-noising).
      gamma: stochasticity in [0, 1] (0: deterministic).
      injected: (N - 1, B, ...) noise re-injected after jumps 0..N-2; required when gamma may be > 0
        and N > 1 (zeros are used when it is None and gamma == 0).
      kind: ``"tcd"`` or ``"ctm"`` (how gamma sets the intermediate time).
      return_trajectory: also return the (N + 1, B, ...) states at the grid times.
    """
    _check_gamma(gamma, kind)
    g = np.asarray(grid) if not isinstance(grid, jax.core.Tracer) else grid
    if not isinstance(g, jax.core.Tracer) and (g.ndim != 1 or g.shape[0] < 2):
        raise ValueError(f"a sampling grid is a 1-D array of >= 2 times, got shape {np.shape(g)}")
    grid = jnp.asarray(grid, jnp.float32)
    n = grid.shape[0] - 1
    if injected is None:
        if not isinstance(gamma, jax.core.Tracer) and float(gamma) > 0 and n > 1:
            raise ValueError(
                f"gamma = {gamma} > 0 needs injected noise of shape {(n - 1, *x.shape)} (or an rng)"
            )
        injected = jnp.zeros((max(n - 1, 0), *x.shape), x.dtype)
    if injected.shape != (n - 1, *x.shape):
        raise ValueError(f"injected noise must have shape {(n - 1, *x.shape)}, got {injected.shape}")
    # the last jump gets a zero noise slot and no re-noising
    zs = jnp.concatenate([injected, jnp.zeros((1, *x.shape), x.dtype)], axis=0)
    last = jnp.arange(n) == n - 1
    b = x.shape[0]

    def body(xc, inp):
        t, t_next, z, is_last = inp
        s = jnp.where(is_last, t_next, intermediate_time(path, t_next, gamma, kind, sigma_min))
        x_s = flow_map(xc, jnp.full((b,), t), jnp.full((b,), s))
        # s == t_next (gamma = 0, or the last jump): forward_diffuse is the identity up to
        # rounding, so skip it to keep the deterministic chain exact
        xn = jnp.where(s == t_next, x_s, forward_diffuse(path, x_s, s, t_next, z))
        return xn, xn if return_trajectory else None

    x_end, traj = jax.lax.scan(body, x, (grid[:-1], grid[1:], zs, last))
    if return_trajectory:
        return x_end, jnp.concatenate([x[None], traj], axis=0)
    return x_end


def sample(
    student: Student,
    params,
    noise: Array,
    grid,
    *,
    gamma: float | Array = 0.0,
    kind: str = "tcd",
    injected: Array | None = None,
    rng: Array | None = None,
    sigma_min: float = 0.002,
    return_trajectory: bool = False,
    **student_kw,
):
    """Samples a student from standard-normal ``noise`` (B, ...): ``x = sigma(grid[0]) * noise``.

    ``student_kw`` (label, guidance, num_steps) go to every student call. The injected noise is
    ``injected`` (N - 1, B, ...) or, when None, drawn from ``rng`` (or zeros if gamma = 0).
    """
    grid_arr = jnp.asarray(grid, jnp.float32)
    n = grid_arr.shape[0] - 1
    if injected is None and rng is not None and n > 1:
        injected = jax.random.normal(rng, (n - 1, *noise.shape), noise.dtype)
    x = student.path.sigma(grid_arr[0]) * noise
    return chain(
        student_flow_map(student, params, **student_kw),
        x,
        grid,
        student.path,
        gamma=gamma,
        injected=injected,
        kind=kind,
        sigma_min=sigma_min,
        return_trajectory=return_trajectory,
    )


def consistency_multistep(
    flow_map: FlowMap, x: Array, grid, path: Path, injected: Array | None = None, return_trajectory=False
):
    """Multistep consistency (LCM / CM) sampling: jump to ``t = 0``, re-noise to the next time.

    Identical to :func:`chain` with ``kind="tcd", gamma=1``; kept as the named reference.
    """
    grid = jnp.asarray(grid, jnp.float32)
    n = grid.shape[0] - 1
    b = x.shape[0]
    traj = [x]
    for i in range(n):
        t = jnp.full((b,), grid[i])
        if i == n - 1:
            x = flow_map(x, t, jnp.full((b,), grid[i + 1]))
        else:
            x = path.interpolate(flow_map(x, t, jnp.zeros((b,))), injected[i], jnp.full((b,), grid[i + 1]))
        traj.append(x)
    return (x, jnp.stack(traj)) if return_trajectory else x


__all__ = [
    "GAMMA_KINDS",
    "FlowMap",
    "chain",
    "consistency_multistep",
    "forward_diffuse",
    "intermediate_time",
    "sample",
    "student_flow_map",
]
