"""Teacher ODE solvers and time grids: pure, jit-able approximations of the flow map ``Phi(x, t, s)``.

Every solver integrates ``dx/dt = velocity(x, t)`` along a time grid (any direction, usually from
t = 1 down to t = 0) with ``lax.scan``. ``velocity`` is any function ``(x (B, ...), t (B,)) -> (B, ...)``
(a teacher with its condition closed over). The exponential integrators (DDIM = DPM-Solver++(1),
DPM-Solver++(2M)) need the path to turn the velocity into ``(x0, eps)`` predictions.

Cost per grid interval in network function evaluations (NFE): ``euler`` 1, ``heun`` 2, ``rk4`` 4,
``ddim`` 1, ``dpmpp_2m`` 1; ``dopri5`` is adaptive (5-6 per accepted or rejected step).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import DDPM, Path, RectifiedFlow, bcast, edm_sigma, t_from_edm_sigma
from fewstep_jax.schedules import flow_match_scheduler

Array = jax.Array
Velocity = Callable[[Array, Array], Array]

NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4, "ddim": 1, "dpmpp_2m": 1}
FIXED_STEP_SOLVERS = tuple(NFE_PER_STEP)


# ---------------------------------------------------------------------------------------------
# time grids: 1-D float arrays of times in [0, 1], from the start time to the end time
# ---------------------------------------------------------------------------------------------


def uniform_grid(num_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> np.ndarray:
    """``num_steps + 1`` equally spaced times from ``t_start`` to ``t_end``."""
    _check_steps(num_steps)
    return np.linspace(t_start, t_end, num_steps + 1, dtype=np.float32)


def edm_grid(
    num_steps: int,
    path: Path,
    sigma_min: float = 0.002,
    sigma_max: float | None = 80.0,
    rho: float = 7.0,
    start_at_one: bool = True,
) -> np.ndarray:
    """Karras et al.'s rho schedule in EDM noise levels ``sigma = sigma_t / alpha_t``, mapped to times.

    ``num_steps - 1`` intervals between ``sigma_max`` and ``sigma_min`` (rho-spaced), then a last
    interval to ``t = 0``. With ``start_at_one`` the first time is replaced by 1 (pure noise), which
    for rectified-flow and cosine paths (infinite sigma at t = 1) is where sampling starts.
    """
    _check_steps(num_steps)
    if num_steps == 1:
        return np.array([1.0, 0.0], np.float32)
    i = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    smax = sigma_max if sigma_max is not None else float("inf")
    # a path whose t = 1 is not pure noise (DDPM: sigma/alpha = 14.6 at t = 1) caps sigma_max,
    # else the top of the rho-grid would all map to t = 1
    path_max = float(edm_sigma(path, jnp.ones(())))
    if np.isfinite(path_max):
        smax = min(smax, path_max)
    sig = (smax ** (1 / rho) + i * (sigma_min ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = np.asarray(t_from_edm_sigma(path, jnp.asarray(sig, jnp.float32)), np.float64)
    if start_at_one:
        ts[0] = 1.0
    return np.concatenate([ts, [0.0]]).astype(np.float32)


def ddpm_leading_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0
) -> np.ndarray:
    """Integer timesteps of diffusers' ``timestep_spacing='leading'`` (descending), e.g. DDIMScheduler."""
    _check_steps(num_steps)
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps)[::-1] * ratio + steps_offset).astype(np.int64)


def ddpm_leading_grid(num_steps: int, path: DDPM, steps_offset: int = 0) -> np.ndarray:
    """Times of :func:`ddpm_leading_timesteps` on a :class:`DDPM` path, with a final ``t = 0``."""
    if not isinstance(path, DDPM):
        raise ValueError(f"the DDPM-leading grid needs a DDPM path, got {path.name!r}")
    ks = ddpm_leading_timesteps(num_steps, path.num_train_timesteps, steps_offset)
    return np.concatenate([np.asarray(path.timestep_to_t(ks)), [0.0]]).astype(np.float32)


def tcd_grid(num_steps: int, path: Path) -> np.ndarray:
    """TCD/LCM's sampling times (``TCDScheduler.set_timesteps`` on the 50-point training grid of
    the distillation losses) with a final ``t = 0``: ``t = (k + 1) / T``, e.g. 4 steps ->
    ``[1, 0.76, 0.5, 0.26, 0]``; on non-DDPM paths the same times (``T = 1000``)."""
    from fewstep_jax.schedules.tcd_scheduler import tcd_timesteps

    T = path.num_train_timesteps if isinstance(path, DDPM) else 1000
    ks = tcd_timesteps(num_steps, num_train_timesteps=T)
    return np.concatenate([(ks + 1.0) / T, [0.0]]).astype(np.float32)


def flow_match_grid(kind: str, num_steps: int, path: Path) -> np.ndarray:
    """The sigmas (with the terminal 0) of diffusers' ``FlowMatchEulerDiscreteScheduler`` on the
    rectified-flow path, whose time they are: ``kind`` is ``flow_match[:key=value...]``, the
    scheduler's options and ``mu`` / ``image_seq_len`` / ``flux_sigmas``
    (``schedules.flow_match_scheduler.grid_from_name``), e.g. ``flow_match:shift=3.0`` (SD3).
    Euler on this grid is the scheduler's sampling loop."""
    if not isinstance(path, RectifiedFlow):
        raise ValueError(f"the flow-match grid is a rectified-flow time grid; got the {path.name!r} path")
    _check_steps(num_steps)
    return flow_match_scheduler.grid_from_name(kind, int(num_steps))


def make_grid(kind: str, num_steps: int, path: Path) -> np.ndarray:
    """A grid by name: ``uniform``, ``edm``, ``ddpm_leading``, ``tcd`` or
    ``flow_match[:key=value...]`` (:func:`flow_match_grid`)."""
    if flow_match_scheduler.is_flow_match_grid(kind):
        return flow_match_grid(kind, num_steps, path)
    if kind == "uniform":
        return uniform_grid(num_steps)
    if kind == "edm":
        return edm_grid(num_steps, path)
    if kind == "ddpm_leading":
        return ddpm_leading_grid(num_steps, path)
    if kind == "tcd":
        return tcd_grid(num_steps, path)
    raise ValueError(
        f"unknown time grid {kind!r}; expected 'uniform', 'edm', 'ddpm_leading', 'tcd' or "
        "'flow_match[:key=value...]'"
    )


def default_grid(path_name: str) -> str:
    """The time grid few-step tables use for a path: EDM's rho-grid on the variance-exploding path,
    uniform time steps otherwise (on VP paths the rho-grid's first step jumps from sigma_max
    straight to sigma_min when N = 2: Heun at 4 NFE then diverges on the DDPM path)."""
    return "edm" if path_name == "ve" else "uniform"


def _check_steps(num_steps: int) -> None:
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def _check_grid(grid) -> Array:
    if not isinstance(grid, jax.core.Tracer):
        g = np.asarray(grid)
        if g.ndim != 1 or g.shape[0] < 2:
            raise ValueError(f"a time grid is a 1-D array of >= 2 times, got shape {g.shape}")
        if g.min() < 0.0 or g.max() > 1.0:
            raise ValueError(f"grid times must lie in [0, 1], got [{g.min():.4g}, {g.max():.4g}]")
    return jnp.asarray(grid, jnp.float32)


# ---------------------------------------------------------------------------------------------
# fixed-step solvers
# ---------------------------------------------------------------------------------------------


def _full(t: Array, x: Array) -> Array:
    return jnp.full((x.shape[0],), t, x.dtype)


def euler_step(velocity: Velocity, x: Array, t: Array, s: Array) -> Array:
    return x + (s - t) * velocity(x, _full(t, x))


def heun_step(velocity: Velocity, x: Array, t: Array, s: Array) -> Array:
    h = s - t
    v1 = velocity(x, _full(t, x))
    v2 = velocity(x + h * v1, _full(s, x))
    return x + 0.5 * h * (v1 + v2)


def rk4_step(velocity: Velocity, x: Array, t: Array, s: Array) -> Array:
    h = s - t
    k1 = velocity(x, _full(t, x))
    k2 = velocity(x + 0.5 * h * k1, _full(t + 0.5 * h, x))
    k3 = velocity(x + 0.5 * h * k2, _full(t + 0.5 * h, x))
    k4 = velocity(x + h * k3, _full(s, x))
    return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


# ---------------------------------------------------------------------------------------------
# the last stage into the data: one rule for solvers, trajectory losses and teacher pairs
# ---------------------------------------------------------------------------------------------


def singular_at_data(path: Path, singular_teacher: bool = False) -> bool:
    """Whether a teacher's velocity is singular at t = 0, so that no solver stage may land there:
    the teacher itself is (``singular_teacher``: the ideal denoiser of a finite set, whose
    ``eps = (x - alpha x0) / sigma`` divides by sigma = 0 off the trajectory), or its path is
    (VP paths: sigma ~ sqrt(t) has an infinite derivative at the data, ``Path.deriv_floor > 0``)."""
    return bool(singular_teacher) or path.deriv_floor > 0


def into_data_is_euler(s: Array, euler_into_data: bool) -> Array:
    """The one rule for a step into the data (EDM's Algorithm 1): with ``euler_into_data`` (a
    teacher :func:`singular_at_data`) a Heun / RK4 step that ends at ``s == 0`` is an Euler step,
    so none of its stages is evaluated at t = 0. ``s`` a scalar or (B,); a bool array like ``s``."""
    return jnp.logical_and(bool(euler_into_data), jnp.asarray(s) == 0.0)


def per_sample_step(
    velocity: Velocity, x: Array, t: Array, s: Array, method: str = "heun", euler_into_data: bool = False
) -> Array:
    """One Euler / Heun step ``t -> s`` with per-sample times ``t, s`` (B,) (the trajectory losses'
    teacher jumps). Heun's second stage follows :func:`into_data_is_euler`: where it applies the step is
    Euler and the stage is evaluated at ``t`` instead (its value unused), so no evaluation at t = 0.
    Cost: 1 NFE (Euler) or 2 (Heun) per sample, an Euler-into-data step included."""
    h = bcast(s - t, x)
    v1 = velocity(x, t)
    if method == "euler":
        return x + h * v1
    if method != "heun":
        raise ValueError(f"per-sample steps are 'euler' or 'heun', got {method!r}")
    last = into_data_is_euler(s, euler_into_data)
    v2 = velocity(x + h * v1, jnp.where(last, t, s))
    return x + 0.5 * h * (v1 + jnp.where(bcast(last, x) > 0, v1, v2))


def x0_eps_from_velocity(velocity: Velocity, path: Path, x: Array, t: Array) -> tuple[Array, Array]:
    """The ``(x0, eps)`` predictions implied by the velocity at ``(x, t)`` (t a scalar)."""
    tt = _full(t, x)
    return path.to_x0_eps(velocity(x, tt), "flow", x, tt)


def ddim_step(velocity: Velocity, path: Path, x: Array, t: Array, s: Array) -> Array:
    """First-order exponential integrator (DDIM, DPM-Solver++(1)): ``alpha_s x0 + sigma_s eps``.

    On the rectified-flow path this is exactly an Euler step (docs/methods.md §1.2).
    """
    x0, eps = x0_eps_from_velocity(velocity, path, x, t)
    a_s, s_s = path.alpha_sigma(s)
    return a_s * x0 + s_s * eps


def solve(
    velocity: Velocity,
    x: Array,
    grid,
    method: str = "euler",
    path: Path | None = None,
    return_trajectory: bool = False,
    euler_into_data: bool = False,
):
    """Integrates ``dx/dt = velocity(x, t)`` from ``grid[0]`` to ``grid[-1]``.

    Args:
      velocity: ``(x (B, ...), t (B,)) -> (B, ...)``.
      x: the state at ``grid[0]``, (B, ...).
      grid: (N + 1,) times (any monotone direction), N steps.
      method: one of ``euler, heun, rk4, ddim, dpmpp_2m``.
      path: required by ``ddim`` and ``dpmpp_2m``.
      return_trajectory: also return the states at every grid time, (N + 1, B, ...).
      euler_into_data: make a Heun / RK4 step that ends at t = 0 an Euler step (the rule of
        :func:`into_data_is_euler`), for teachers :func:`singular_at_data`. Such a step costs 1 NFE.
    Returns:
      the state at ``grid[-1]`` (and the trajectory).
    """
    grid = _check_grid(grid)
    if method not in NFE_PER_STEP:
        raise ValueError(f"unknown solver {method!r}; expected one of {FIXED_STEP_SOLVERS}")
    if method in ("ddim", "dpmpp_2m") and path is None:
        raise ValueError(f"solver {method!r} needs the teacher's path")
    if method == "dpmpp_2m":
        return _dpmpp_2m(velocity, path, x, grid, return_trajectory)

    step_fns = {
        "euler": euler_step,
        "heun": heun_step,
        "rk4": rk4_step,
        "ddim": lambda v, x, t, s: ddim_step(v, path, x, t, s),
    }
    step_fn = step_fns[method]

    def body(xc, ts):
        if euler_into_data and method in ("heun", "rk4"):
            xn = jax.lax.cond(
                into_data_is_euler(ts[1], True),
                lambda: euler_step(velocity, xc, ts[0], ts[1]),
                lambda: step_fn(velocity, xc, ts[0], ts[1]),
            )
        else:
            xn = step_fn(velocity, xc, ts[0], ts[1])
        return xn, xn if return_trajectory else None

    pairs = jnp.stack([grid[:-1], grid[1:]], axis=1)
    x_end, traj = jax.lax.scan(body, x, pairs)
    if return_trajectory:
        return x_end, jnp.concatenate([x[None], traj], axis=0)
    return x_end


def _dpmpp_2m(velocity: Velocity, path: Path, x: Array, grid: Array, return_trajectory: bool):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep; first order on the first step
    and on a last step that ends at sigma = 0 (where lambda = +inf), as diffusers' ``lower_order_final``."""

    def lam(t):
        a, s = path.alpha_sigma(t)
        return jnp.log(a) - jnp.log(jnp.maximum(s, 1e-20))

    def body(carry, inp):
        xc, x0_prev, h_prev, first = carry
        t, s = inp[0], inp[1]
        x0, _ = x0_eps_from_velocity(velocity, path, xc, t)
        a_s, s_s = path.alpha_sigma(s)
        _, s_t = path.alpha_sigma(t)
        h = lam(s) - lam(t)
        last = s_s <= 0.0
        r = h_prev / jnp.where(last, 1.0, h)
        d2 = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        d = jnp.where(first | last, x0, d2)
        # (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) D, written stably for sigma_s -> 0
        ratio = jnp.where(last, 0.0, s_s / jnp.maximum(s_t, 1e-20))
        em1 = jnp.where(last, -1.0, jnp.expm1(-h))
        xn = ratio * xc - a_s * em1 * d
        return (xn, x0, h, jnp.array(False)), xn if return_trajectory else None

    pairs = jnp.stack([grid[:-1], grid[1:]], axis=1)
    init = (x, jnp.zeros_like(x), jnp.ones((), x.dtype), jnp.array(True))
    (x_end, *_), traj = jax.lax.scan(body, init, pairs)
    if return_trajectory:
        return x_end, jnp.concatenate([x[None], traj], axis=0)
    return x_end


# ---------------------------------------------------------------------------------------------
# adaptive reference solver
# ---------------------------------------------------------------------------------------------

# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def solve_adaptive(
    velocity: Velocity,
    x: Array,
    t_start: float = 1.0,
    t_end: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
) -> tuple[Array, Array]:
    """Adaptive Dormand-Prince 5(4) (RK45) with one step size for the whole batch.

    The error norm is the RMS over all elements of ``err / (atol + rtol * max(|x|, |x_new|))``.
    Returns ``(x_end, nfe)``; raises nothing inside jit, but ``nfe`` reaching ``7 * max_steps``
    means the budget ran out before ``t_end``.
    """
    direction = jnp.sign(t_end - t_start)
    t_end_a = jnp.asarray(t_end, jnp.float32)

    def stages(xc, t, h):
        ks = []
        for c, arow in zip(_DP_C, _DP_A):
            xi = xc
            for a, k in zip(arow, ks):
                if a != 0.0:
                    xi = xi + h * a * k
            ks.append(velocity(xi, _full(t + c * h, xc)))
        x5 = xc + h * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)
        x4 = xc + h * sum(b * k for b, k in zip(_DP_B4, ks) if b != 0.0)
        return x5, x5 - x4

    def cond(c):
        _, t, _, n, _ = c
        return (direction * (t_end_a - t) > 1e-7) & (n < max_steps)

    def body(c):
        xc, t, h, n, nfe = c
        h = direction * jnp.minimum(jnp.abs(h), jnp.abs(t_end_a - t))
        x5, err = stages(xc, t, h)
        scale = atol + rtol * jnp.maximum(jnp.abs(xc), jnp.abs(x5))
        en = jnp.sqrt(jnp.mean((err / scale) ** 2))
        accept = en <= 1.0
        factor = jnp.clip(0.9 * jnp.maximum(en, 1e-10) ** (-0.2), 0.2, 5.0)
        xn = jnp.where(accept, x5, xc)
        tn = jnp.where(accept, t + h, t)
        return xn, tn, h * factor, n + 1, nfe + 7

    h0 = direction * 1e-2
    init = (x, jnp.asarray(t_start, jnp.float32), h0, jnp.array(0), jnp.array(0))
    x_end, *_, nfe = jax.lax.while_loop(cond, body, init)
    return x_end, nfe


def nfe_of(method: str, num_steps: int) -> int:
    """Network function evaluations of ``num_steps`` steps of a fixed-step solver."""
    return NFE_PER_STEP[method] * num_steps


__all__ = [
    "FIXED_STEP_SOLVERS",
    "NFE_PER_STEP",
    "ddim_step",
    "ddpm_leading_grid",
    "ddpm_leading_timesteps",
    "default_grid",
    "edm_grid",
    "euler_step",
    "flow_match_grid",
    "heun_step",
    "into_data_is_euler",
    "make_grid",
    "nfe_of",
    "per_sample_step",
    "rk4_step",
    "singular_at_data",
    "solve",
    "solve_adaptive",
    "tcd_grid",
    "uniform_grid",
    "x0_eps_from_velocity",
]
