"""Trajectory losses: TraFlow and the baselines that are configs of its parts (METHODS.md 2.3, 5).

Shared parts, written once:

* :func:`time_grid` / :func:`sample_grid_times`: CTM-style discrete times ``s <= r < t`` on a grid
  ``0 = t_0 < ... < t_N = 1`` (``n ~ U{1..N}``, jump ``k ~ p(k)`` on ``{1..min(n, K)}``,
  ``r = t_{n-k}``, ``s = t_m`` with ``m ~ U{0..n-k}``).
* :func:`teacher_jump`: a per-sample teacher solve ``t -> r`` over the ``k`` grid intervals of the
  jump (each split into ``substeps`` equal steps), vectorised by running ``max_jump * substeps``
  steps whose times are clamped at ``r``: padded steps have zero length and are exact identities
  of Euler / Heun, so no masking is needed (the cost is that of the longest jump).
* :func:`distance`: per-sample L2 (mean over dims) or pseudo-Huber (elementwise or vector form).
* :func:`shortcut_target`, :func:`meanflow_target`: the bootstrap and JVP targets.

Registered terms (``factory(cfg, student) -> term``, see ``losses/api.py``): ``traflow`` (all
TraFlow parts on one shared time sample and teacher solve), ``traflow_rec``, ``traflow_vel``,
``traflow_con``, ``straightness`` (one part each), ``ctm``, ``cd``, ``reflow``, ``reflow_distill``,
``shortcut``, ``meanflow``. Every target is under ``stop_gradient``; teacher and EMA params never
receive gradient. ``g`` below is the student's velocity reading (``student.velocity``), the
average velocity over [s, t] of an Euler-form student: ``G(x, t, s) = x + (s - t) g(x, t, s)``.

Data: ``x0 = batch["x"]``; the noise is ``batch["noise"] / path.prior_scale`` when the batch has
one (teacher pairs of :mod:`fewstep_jax.reflow`), else fresh standard normal noise. A ``label``
in the batch conditions both networks.

Teacher cost (metric ``teacher_nfe``, see ``losses/api.py``): a term with a teacher jump pays
``max_jump * substeps`` solver steps per example whatever its ``k`` (the padded steps are real
evaluations), x2 for Heun, plus one velocity for ``vel_variant`` A, all x2 with guidance != 1;
the TraFlow core's parts share its one solve, counted once in that term. ``unpadded_nfe`` is
what a solve of each sample's own ``k * substeps`` steps would cost (the useful part).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.distances import distance
from fewstep_jax.paths import Path, bcast
from fewstep_jax.students import Student
from fewstep_jax.teachers.base import Teacher

Array = jax.Array
sg = jax.lax.stop_gradient

DISTANCES = ("l2", "huber", "huber_vec")
JUMP_WEIGHTINGS = ("linear", "uniform")
JUMP_SOLVERS = ("euler", "heun")


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def _options(cfg: Any, defaults: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``defaults`` overridden by ``cfg`` (a ConfigDict / mapping); unknown keys are errors."""
    given = dict(cfg.items()) if cfg is not None else {}
    given.pop("weight", None)  # applied by the train step
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for loss term {name!r}; known: {sorted(defaults)}")
    out = {**defaults, **given}
    if "distance" in out and out["distance"] not in DISTANCES:
        raise ValueError(f"{name}: distance must be one of {DISTANCES}, got {out['distance']!r}")
    if "solver" in out and out["solver"] not in JUMP_SOLVERS:
        raise ValueError(f"{name}: solver must be one of {JUMP_SOLVERS}, got {out['solver']!r}")
    if "jump_weighting" in out and out["jump_weighting"] not in JUMP_WEIGHTINGS:
        raise ValueError(
            f"{name}: jump_weighting must be one of {JUMP_WEIGHTINGS}, got {out['jump_weighting']!r}"
        )
    for key in ("target", "bootstrap_target"):
        if key in out and out[key] not in ("ema", "online"):
            raise ValueError(f"{name}: {key} must be 'ema' or 'online', got {out[key]!r}")
    return out


# time-grid options shared by the grid-based terms (CTM defaults for CIFAR-10: N = 18, K = 17)
_GRID = {"grid": "uniform", "num_grid": 18, "max_jump": 17, "jump_weighting": "linear"}
_SOLVE = {"solver": "heun", "substeps": 1, "guidance": 1.0}
_DIST = {"distance": "l2", "huber_c": 0.0}


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------


def _mse(a: Array, b: Array) -> Array:
    return distance(a, b, "l2")


# ---------------------------------------------------------------------------------------------
# time sampling on a grid
# ---------------------------------------------------------------------------------------------


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
    rng: Array, grid: Array | np.ndarray, batch: int, max_jump: int, weighting: str = "linear"
) -> GridTimes:
    """``n ~ U{1..N}``, ``k ~ p(k)`` on ``{1..min(n, K)}`` (``p ∝ k`` for ``linear``, flat for
    ``uniform``), ``m ~ U{0..n-k}``; jit-able, vectorised over the batch."""
    if weighting not in JUMP_WEIGHTINGS:
        raise ValueError(f"jump weighting must be one of {JUMP_WEIGHTINGS}, got {weighting!r}")
    if int(max_jump) < 1:
        raise ValueError(f"max_jump must be >= 1, got {max_jump}")
    grid = jnp.asarray(grid, jnp.float32)
    N = grid.shape[0] - 1
    K = min(int(max_jump), N)
    kn, kk, km = jax.random.split(rng, 3)
    n = jax.random.randint(kn, (batch,), 1, N + 1)
    ks = jnp.arange(1, K + 1)
    logw = jnp.log(ks.astype(jnp.float32)) if weighting == "linear" else jnp.zeros((K,), jnp.float32)
    logits = jnp.where(ks[None, :] <= jnp.minimum(n, K)[:, None], logw[None, :], -jnp.inf)
    k = jax.random.categorical(kk, logits, axis=-1) + 1
    hi = n - k  # m ~ U{0..hi}
    m = jnp.minimum(jnp.floor(jax.random.uniform(km, (batch,)) * (hi + 1)).astype(jnp.int32), hi)
    return GridTimes(n, k, m, grid[n], grid[n - k], grid[m])


# ---------------------------------------------------------------------------------------------
# per-sample teacher solves
# ---------------------------------------------------------------------------------------------


def _step(velocity, x: Array, t: Array, s: Array, method: str) -> Array:
    """One per-sample Euler / Heun step t -> s (t, s (B,))."""
    h = bcast(s - t, x)
    v1 = velocity(x, t)
    if method == "euler":
        return x + h * v1
    v2 = velocity(x + h * v1, s)
    return x + 0.5 * h * (v1 + v2)


def solve_per_sample(velocity, x: Array, times: Array, method: str = "heun") -> Array:
    """Integrates along per-sample time rows ``times`` (B, M + 1) with M Euler / Heun steps."""
    if method not in JUMP_SOLVERS:
        raise ValueError(f"per-sample solver must be one of {JUMP_SOLVERS}, got {method!r}")

    def body(xc, ts):
        return _step(velocity, xc, ts[0], ts[1], method), None

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
) -> Array:
    """``sg[Phi_teacher(x, t_n -> t_{n-k})]`` with ``k * substeps`` steps per sample (B, ...).

    Cost: ``max_jump * substeps`` steps (x2 NFE for Heun) for every sample, whatever its ``k``.
    """
    times = jump_times(grid, n, k, max_jump, substeps)
    velocity = lambda xx, tt: teacher.velocity(xx, tt, label, guidance)
    return sg(solve_per_sample(velocity, x, times, method))


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _need_teacher(inputs: LossInputs, name: str) -> Teacher:
    if inputs.teacher is None:
        raise ValueError(f"loss term {name!r} needs a teacher (inputs.teacher is None)")
    return inputs.teacher


def _target_params(inputs: LossInputs, params, which: str, name: str):
    """The frozen params of a target network: the EMA ``target`` or the online params."""
    if which == "online":
        return sg(params)
    if "target" not in inputs.ema:
        raise ValueError(
            f"loss term {name!r} needs the EMA target params inputs.ema['target'] "
            f"(have {sorted(inputs.ema)}); set a target EMA in the config or target='online'"
        )
    return sg(inputs.ema["target"])


def _data(batch: Mapping[str, Array], rng: Array, path: Path, name: str, pairs: bool = False):
    """``(x0, eps, label)``: eps from the batch's teacher noise when present, else fresh noise."""
    if "x" not in batch:
        raise ValueError(f"loss term {name!r} needs batch key 'x'; got keys {sorted(batch)}")
    x0 = jnp.asarray(batch["x"], jnp.float32)
    if "noise" in batch:
        eps = jnp.asarray(batch["noise"], jnp.float32) / path.prior_scale
        if eps.shape != x0.shape:
            raise ValueError(f"batch 'noise' {eps.shape} and 'x' {x0.shape} must have the same shape")
    elif pairs:
        raise ValueError(
            f"loss term {name!r} trains on teacher (noise, sample) pairs: the batch needs keys 'noise' "
            f"and 'x' (see fewstep_jax.reflow); got keys {sorted(batch)}"
        )
    else:
        eps = jax.random.normal(rng, x0.shape, jnp.float32)
    return x0, eps, batch.get("label")


def flow(student: Student, params, x: Array, t: Array, s: Array, **kw) -> tuple[Array, Array]:
    """``(G(x, t, s), g(x, t, s))`` with one network call for Euler-form students."""
    g = student.velocity(params, x, t, s, **kw)
    if student.form == "euler":
        return x + bcast(jnp.broadcast_to(s - t, (x.shape[0],)), x) * g, g
    return student(params, x, t, s, **kw), g


def _mean(v: Array) -> Array:
    return jnp.mean(v).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# TraFlow (and CTM) core: one time sample, one teacher solve, every part
# ---------------------------------------------------------------------------------------------

_TRAFLOW = {
    **_GRID,
    **_SOLVE,
    **_DIST,
    "lam_rec": 1.0,
    "lam_vel": 1.0,
    "lam_con": 1.0,
    "lam_straight": 0.0,
    "lam_dsm": 0.0,
    "vel_variant": "A",
    "target": "ema",
}


def _traflow_core(opts: dict, student: Student, name: str):
    if opts["vel_variant"] not in ("A", "B"):
        raise ValueError(f"{name}: vel_variant must be 'A' or 'B', got {opts['vel_variant']!r}")
    lam = {p: float(opts[f"lam_{p}"]) for p in ("rec", "vel", "con", "straight", "dsm")}
    if not any(lam.values()):
        raise ValueError(f"{name}: every lam_* weight is zero")
    if lam["straight"] and not student.uses_s:
        # an s-agnostic g makes it identically zero (s-agnostic con / vel are allowed: TCD-like ablation)
        raise ValueError(f"{name}: the straightness term needs an s-conditioned student (uses_s)")
    path = student.path
    grid = jnp.asarray(time_grid(opts["grid"], opts["num_grid"], path))
    K = min(int(opts["max_jump"]), int(opts["num_grid"]))
    variant_b = opts["vel_variant"] == "B"
    need_r = lam["rec"] or lam["straight"] or (lam["vel"] and variant_b)
    need_s = lam["con"] or lam["straight"] or (lam["vel"] and not variant_b)
    need_xr = lam["rec"] or lam["con"] or (lam["vel"] and variant_b)
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])
    per_call = teacher_evals_per_call(opts["guidance"])
    nfe_step = solvers.NFE_PER_STEP[opts["solver"]]
    # teacher evaluations per example besides the jump: variant A's velocity target
    nfe_vel = per_call if lam["vel"] and not variant_b else 0
    nfe_jump = per_call * nfe_step * K * int(opts["substeps"]) if need_xr else 0

    def term(params, inputs: LossInputs, batch, rng):
        teacher = _need_teacher(inputs, name)
        tp = _target_params(inputs, params, opts["target"], name) if lam["con"] else None
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = _data(batch, k_noise, path, name)
        B = x0.shape[0]
        ts = sample_grid_times(k_time, grid, B, K, opts["jump_weighting"])
        x_t = path.interpolate(x0, eps, ts.t)
        kw = {"label": label, "rng": k_drop, "train": True}
        x_r = None
        if need_xr:
            x_r = teacher_jump(
                teacher, x_t, grid, ts.n, ts.k, K, opts["solver"], opts["substeps"], label, opts["guidance"]
            )
        if need_r:
            G_tr, g_tr = flow(student, params, x_t, ts.t, ts.r, **kw)
        if need_s:
            G_ts, g_ts = flow(student, params, x_t, ts.t, ts.s, **kw)

        parts = {}
        if lam["rec"]:
            parts["rec"] = _mean(d(G_tr, x_r))
        if lam["vel"]:
            if variant_b:
                u_avg = sg((x_t - x_r) / bcast(ts.t - ts.r, x_t))
                parts["vel"] = _mean(_mse(g_tr, u_avg))
            else:
                u = sg(teacher.velocity(x_t, ts.t, label, opts["guidance"]))
                parts["vel"] = _mean(_mse(g_ts, u))
        if lam["con"]:
            zero = jnp.zeros_like(ts.s)
            tkw = {"label": label}
            est = student(tp, G_ts, ts.s, zero, **tkw)  # gradient through the input only
            inner = sg(student(sg(params), x_r, ts.r, ts.s, **tkw))
            tgt = sg(student(tp, inner, ts.s, zero, **tkw))
            parts["con"] = _mean(d(est, tgt))
        if lam["straight"]:
            # both ends live: zero iff the student's jumps from x_t to r and to s share one velocity
            parts["straight"] = _mean(_mse(g_ts, g_tr))
        if lam["dsm"]:
            x0_hat, _ = student.x0_eps(params, x_t, ts.t, ts.t, **kw)
            parts["dsm"] = _mean(_mse(x0_hat, x0))
        total = sum(lam[p] * v for p, v in parts.items())
        metrics = {f"{name}/{p}": v for p, v in parts.items()}
        metrics[f"{name}/jump"] = _mean(ts.k)
        if nfe_jump or nfe_vel:
            metrics["teacher_nfe"] = float(nfe_jump + nfe_vel)
            if need_xr:
                metrics["unpadded_nfe"] = per_call * nfe_step * int(opts["substeps"]) * _mean(ts.k) + nfe_vel
        return total, metrics

    return term


def _traflow_factory(name: str, fixed: Mapping[str, Any]):
    """A factory of the TraFlow core with some weights fixed (the single-part terms)."""
    defaults = {k: v for k, v in _TRAFLOW.items() if k not in fixed}

    def factory(cfg, student: Student):
        return _traflow_core({**_options(cfg, defaults, name), **fixed}, student, name)

    return factory


_NONE = {"lam_rec": 0.0, "lam_vel": 0.0, "lam_con": 0.0, "lam_straight": 0.0, "lam_dsm": 0.0}
traflow = register("traflow")(_traflow_factory("traflow", {}))
traflow_rec = register("traflow_rec")(
    _traflow_factory("traflow_rec", {**_NONE, "lam_rec": 1.0, "vel_variant": "A", "target": "ema"})
)
traflow_vel = register("traflow_vel")(
    _traflow_factory("traflow_vel", {**_NONE, "lam_vel": 1.0, "target": "ema"})
)
traflow_con = register("traflow_con")(
    _traflow_factory("traflow_con", {**_NONE, "lam_con": 1.0, "vel_variant": "A"})
)
straightness = register("straightness")(
    _traflow_factory("straightness", {**_NONE, "lam_straight": 1.0, "vel_variant": "A", "target": "ema"})
)
# CTM without GAN: the soft-consistency term (+ optional DSM on the G(x, t, t) denoiser)
ctm = register("ctm")(
    _traflow_factory(
        "ctm", {"lam_rec": 0.0, "lam_vel": 0.0, "lam_straight": 0.0, "lam_con": 1.0, "vel_variant": "A"}
    )
)


# ---------------------------------------------------------------------------------------------
# consistency distillation
# ---------------------------------------------------------------------------------------------


@register("cd")
def cd(cfg, student: Student):
    """CD: ``d(G_theta(x_{t_n}, t_n, 0), sg G_tgt(Phi(x_{t_n}, t_n -> t_{n-1}), t_{n-1}, 0))``,
    ``n ~ U{1..N}``, one teacher step (Heun); target = online params under stop-gradient (CM-JAX)
    or the EMA target (``target='ema'``)."""
    defaults = {
        **_SOLVE,
        **_DIST,
        "grid": "edm",
        "num_grid": 18,
        "target": "online",
    }
    opts = _options(cfg, defaults, "cd")
    nfe = teacher_evals_per_call(opts["guidance"]) * solvers.nfe_of(opts["solver"], int(opts["substeps"]))
    path = student.path
    grid = jnp.asarray(time_grid(opts["grid"], opts["num_grid"], path))
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])

    def term(params, inputs: LossInputs, batch, rng):
        teacher = _need_teacher(inputs, "cd")
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = _data(batch, k_noise, path, "cd")
        ts = sample_grid_times(k_time, grid, x0.shape[0], 1)
        x_t = path.interpolate(x0, eps, ts.t)
        x_r = teacher_jump(
            teacher, x_t, grid, ts.n, ts.k, 1, opts["solver"], opts["substeps"], label, opts["guidance"]
        )
        zero = jnp.zeros_like(ts.t)
        est = student(params, x_t, ts.t, zero, label=label, rng=k_drop, train=True)
        tp = _target_params(inputs, params, opts["target"], "cd")
        tgt = sg(student(tp, x_r, ts.r, zero, label=label, rng=k_drop, train=True))
        loss = _mean(d(est, tgt))
        return loss, {"cd/loss": loss, "teacher_nfe": float(nfe)}

    return term


# ---------------------------------------------------------------------------------------------
# reflow and its one-step distillation (teacher pairs)
# ---------------------------------------------------------------------------------------------


@register("reflow")
def reflow(cfg, student: Student):
    """Flow matching on teacher pairs: ``|g(x_t, t, t) - (alpha' x + sigma' noise)|^2`` (RF:
    ``noise - x``), ``x_t`` on the line between the pair, ``t ~ U[0, 1 - t_eps]``."""
    opts = _options(cfg, {"t_eps": 1e-3}, "reflow")
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = _data(batch, k_noise, path, "reflow", pairs=True)
        t = jax.random.uniform(k_time, (x0.shape[0],), maxval=1.0 - opts["t_eps"])
        x_t = path.interpolate(x0, eps, t)
        target = sg(path.from_x0_eps("flow", x0, eps, t))
        g = student.velocity(params, x_t, t, t, label=label, rng=k_drop, train=True)
        loss = _mean(_mse(g, target))
        return loss, {"reflow/loss": loss}

    return term


@register("reflow_distill")
def reflow_distill(cfg, student: Student):
    """Distillation of a (re)flow on its pairs: ``d(G(x_t, t, 0), x)`` with ``t = j / num_steps``,
    ``j ~ U{1..num_steps}`` (``num_steps = 1``: ``G(noise, 1, 0)`` vs the paired sample)."""
    opts = _options(cfg, {**_DIST, "num_steps": 1}, "reflow_distill")
    path = student.path
    k_steps = int(opts["num_steps"])
    if k_steps < 1:
        raise ValueError(f"reflow_distill: num_steps must be >= 1, got {k_steps}")
    d = lambda a, b: distance(a, b, opts["distance"], opts["huber_c"])

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_drop = jax.random.split(rng, 3)
        x0, eps, label = _data(batch, k_noise, path, "reflow_distill", pairs=True)
        j = jax.random.randint(k_time, (x0.shape[0],), 1, k_steps + 1)
        t = j.astype(jnp.float32) / k_steps
        x_t = path.interpolate(x0, eps, t)
        pred = student(params, x_t, t, jnp.zeros_like(t), label=label, rng=k_drop, train=True)
        loss = _mean(d(pred, x0))
        return loss, {"reflow_distill/loss": loss}

    return term


# ---------------------------------------------------------------------------------------------
# shortcut models
# ---------------------------------------------------------------------------------------------


def shortcut_target(
    student: Student,
    params,
    x: Array,
    t: Array,
    d: Array,
    label: Array | None = None,
    clip: float | None = 4.0,
) -> Array:
    """Bootstrap target of a jump of size ``d`` (B,) from ``t``: the mean of two ``d/2`` velocities
    of ``params`` (the EMA), states and target clipped to ``[-clip, clip]`` (None: no clip)."""
    cl = (lambda v: jnp.clip(v, -clip, clip)) if clip else (lambda v: v)
    half = 0.5 * d
    v1 = student.velocity(params, x, t, t - half, label=label)
    x_mid = cl(x - bcast(half, x) * v1)
    v2 = student.velocity(params, x_mid, t - half, t - d, label=label)
    return sg(cl(0.5 * (v1 + v2)))


@register("shortcut")
def shortcut(cfg, student: Student):
    """Shortcut models: rows ``[0, B // bootstrap_every)`` regress ``g(x_t, t, t - d)`` on the
    bootstrap target (``d = 2^-i``, ``i ~ U{0..log2 M - 1}``, ``t`` a multiple of ``d``), the other
    rows do flow matching at ``d = 1/M`` (``t ~ U{1..M}/M``, target ``alpha' x + sigma' eps``)."""
    opts = _options(
        cfg,
        {"denoise_timesteps": 128, "bootstrap_every": 8, "bootstrap_target": "ema", "clip": 4.0},
        "shortcut",
    )
    M = int(opts["denoise_timesteps"])
    if M < 2 or M & (M - 1):
        raise ValueError(f"shortcut: denoise_timesteps must be a power of 2 >= 2, got {M}")
    if int(opts["bootstrap_every"]) < 1:
        raise ValueError(f"shortcut: bootstrap_every must be >= 1, got {opts['bootstrap_every']}")
    if not student.uses_s:
        raise ValueError("shortcut: the student must take s (uses_s=True): it is conditioned on d = t - s")
    levels = int(math.log2(M))
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_lvl, k_j, k_fm, k_drop = jax.random.split(rng, 5)
        x0, eps, label = _data(batch, k_noise, path, "shortcut")
        B = x0.shape[0]
        nb = B // int(opts["bootstrap_every"])
        lvl = jax.random.randint(k_lvl, (B,), 0, levels)
        d_b = jnp.exp2(-lvl.astype(jnp.float32))
        j_b = jnp.floor(jax.random.uniform(k_j, (B,)) * jnp.exp2(lvl.astype(jnp.float32))) + 1.0
        t_fm = jax.random.randint(k_fm, (B,), 1, M + 1).astype(jnp.float32) / M
        is_b = jnp.arange(B) < nb
        d = jnp.where(is_b, d_b, 1.0 / M)
        t = jnp.where(is_b, jnp.minimum(j_b * d_b, 1.0), t_fm)
        x_t = path.interpolate(x0, eps, t)
        v_fm = path.from_x0_eps("flow", x0, eps, t)
        if nb:
            tp = _target_params(inputs, params, opts["bootstrap_target"], "shortcut")
            sl = lambda a: None if a is None else a[:nb]
            v_b = shortcut_target(student, tp, x_t[:nb], t[:nb], d[:nb], sl(label), opts["clip"])
            target = jnp.concatenate([v_b, v_fm[nb:]], axis=0)
        else:
            target = v_fm
        g = student.velocity(params, x_t, t, t - d, label=label, rng=k_drop, train=True)
        err = _mse(g, sg(target))
        loss = _mean(err)
        metrics = {"shortcut/loss": loss, "shortcut/fm": _mean(err[nb:])}
        if nb:
            metrics["shortcut/bootstrap"] = _mean(err[:nb])
        return loss, metrics

    return term


# ---------------------------------------------------------------------------------------------
# mean flow
# ---------------------------------------------------------------------------------------------


def meanflow_target(student: Student, params, x: Array, t: Array, s: Array, v: Array, label=None) -> Array:
    """``sg[v - (t - s)(v . d_x g + d_t g)]`` at ``(x, t, s)`` via one JVP (s held fixed)."""
    fn = lambda xx, tt: student.velocity(sg(params), xx, tt, s, label=label)
    _, dg = jax.jvp(fn, (x, t), (v, jnp.ones_like(t)))
    return sg(v - bcast(t - s, x) * dg)


@register("meanflow")
def meanflow(cfg, student: Student):
    """MeanFlow: ``|g(x_t, t, s) - meanflow_target|^2`` with ``v`` the teacher velocity
    (``velocity='teacher'``) or the conditional one ``alpha' x + sigma' eps`` (``'conditional'``);
    a fraction ``equal_fraction`` of rows has ``s = t``; optional adaptive weight
    ``sg(1 / (err + c)^p)``."""
    opts = _options(
        cfg,
        {
            "velocity": "teacher",
            "equal_fraction": 0.75,
            "time_sampler": "uniform",
            "logit_mean": -0.4,
            "logit_std": 1.0,
            "adaptive_p": 0.0,
            "adaptive_c": 1e-3,
            "guidance": 1.0,
        },
        "meanflow",
    )
    if opts["velocity"] not in ("teacher", "conditional"):
        raise ValueError(f"meanflow: velocity must be 'teacher' or 'conditional', got {opts['velocity']!r}")
    if opts["time_sampler"] not in ("uniform", "logit_normal"):
        raise ValueError(
            f"meanflow: time_sampler must be 'uniform' or 'logit_normal', got {opts['time_sampler']!r}"
        )
    if not student.uses_s:
        raise ValueError("meanflow: the student must take s (uses_s=True)")
    path = student.path

    def term(params, inputs: LossInputs, batch, rng):
        k_noise, k_time, k_eq, k_drop = jax.random.split(rng, 4)
        x0, eps, label = _data(batch, k_noise, path, "meanflow")
        B = x0.shape[0]
        if opts["time_sampler"] == "uniform":
            u = jax.random.uniform(k_time, (2, B))
        else:
            u = jax.nn.sigmoid(opts["logit_mean"] + opts["logit_std"] * jax.random.normal(k_time, (2, B)))
        t, s = jnp.max(u, axis=0), jnp.min(u, axis=0)
        s = jnp.where(jax.random.uniform(k_eq, (B,)) < opts["equal_fraction"], t, s)
        x_t = path.interpolate(x0, eps, t)
        if opts["velocity"] == "teacher":
            v = sg(_need_teacher(inputs, "meanflow").velocity(x_t, t, label, opts["guidance"]))
        else:
            v = path.from_x0_eps("flow", x0, eps, t)
        target = meanflow_target(student, params, x_t, t, s, v, label)
        g = student.velocity(params, x_t, t, s, label=label, rng=k_drop, train=True)
        err = _mse(g, target)
        if opts["adaptive_p"]:
            err = err * sg(1.0 / (err + opts["adaptive_c"]) ** opts["adaptive_p"])
        loss = _mean(err)
        metrics = {"meanflow/loss": loss}
        if opts["velocity"] == "teacher":
            metrics["teacher_nfe"] = float(teacher_evals_per_call(opts["guidance"]))
        return loss, metrics

    return term


__all__ = [
    "DISTANCES",
    "GridTimes",
    "cd",
    "ctm",
    "distance",
    "flow",
    "jump_times",
    "meanflow",
    "meanflow_target",
    "reflow",
    "reflow_distill",
    "sample_grid_times",
    "shortcut",
    "shortcut_target",
    "solve_per_sample",
    "straightness",
    "teacher_jump",
    "time_grid",
    "traflow",
    "traflow_con",
    "traflow_rec",
    "traflow_vel",
]
