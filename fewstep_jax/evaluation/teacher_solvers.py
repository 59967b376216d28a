"""The teacher-solver table: flow-map error and sample distance of every solver at every NFE.

This is the baseline every student is measured against (same noise, same reference, same
metrics): rows ``{testbed, method, nfe, flow_map_mse, <distances>}`` plus two reference rows, the
converged teacher (the adaptive reference flow map itself) and, for mixtures, fresh exact data
samples of the same size (the finite-sample floor of the distance).

On a DDPM path the table also offers the integer loops diffusers users run: a method
``diffusers_ddim``, ``diffusers_ddpm``, ``diffusers_lcm`` or ``diffusers_tcd``, optionally followed
by scheduler options ``:key=value`` (e.g. ``diffusers_ddim:timestep_spacing=trailing:clip_sample=false``;
no commas, since a config's solver list is comma-separated), is ``DDIMScheduler`` /
``DDPMScheduler`` / ``LCMScheduler`` / ``TCDScheduler`` with diffusers' defaults and the teacher's
betas (:func:`diffusers_scheduler`). ``DDIMScheduler()``'s defaults clip x0 to [-1, 1] and space
timesteps ``leading``: what a user of the defaults sees; few-step models are sampled with
``timestep_spacing=trailing``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.errors import UserError
from fewstep_jax.evaluation.scoring import evaluate_samplers, make_reference, reference_rows
from fewstep_jax.metrics import sample_distances
from fewstep_jax.paths import DDPM
from fewstep_jax.schedules.scheduler_config import SchedulerConfig, read_scheduler_config
from fewstep_jax.solvers import default_grid
from fewstep_jax.teachers.base import condition_rows
from fewstep_jax.testbeds.exact import ExactTestbed


@partial(jax.jit, static_argnames=("method", "euler_into_data", "guidance"))
def _solve(teacher, x, grid, method, euler_into_data, label=None, guidance=1.0):
    # guidance is static: 1.0 means unguided (what an unconditional teacher accepts)
    return teacher.solve(x, grid, method, label, guidance, euler_into_data=euler_into_data)


def solve_batched(
    teacher,
    x1: np.ndarray,
    grid: np.ndarray,
    method: str,
    batch_size: int,
    euler_into_data: bool = False,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
) -> np.ndarray:
    """A fixed-step solve of (N, ...) noise in batches (the teacher passed as a jit argument);
    ``label`` (N,) and the Imagen CFG scale ``guidance`` condition a class-conditional teacher."""
    out = [
        np.asarray(
            _solve(
                teacher,
                jnp.asarray(x1[i : i + batch_size]),
                jnp.asarray(grid),
                method,
                euler_into_data,
                condition_rows(label, i, i + batch_size),
                float(guidance),
            )
        )
        for i in range(0, len(x1), batch_size)
    ]
    return np.concatenate(out)


DIFFUSERS_SOLVERS = {
    "diffusers_ddim": "DDIMScheduler",
    "diffusers_ddpm": "DDPMScheduler",
    "diffusers_lcm": "LCMScheduler",
    "diffusers_tcd": "TCDScheduler",
}
# step arguments (not config keys) a diffusers solver name may set
_STEP_OPTIONS = ("eta", "use_clipped_model_output")
# the beta table is the teacher's path's: these are not the solver name's to change
_PATH_OPTIONS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
# diffusers' prediction_type -> the project's prediction kind
_KINDS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def is_diffusers_solver(method: str) -> bool:
    return method.split(":", 1)[0] in DIFFUSERS_SOLVERS


def _option_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def diffusers_scheduler(method: str, path) -> tuple[SchedulerConfig, float | None, bool]:
    """``(scheduler config, eta, use_clipped_model_output)`` of a diffusers solver name on a DDPM path.

    ``method`` is ``diffusers_<ddim|ddpm|lcm|tcd>[:key=value...]``: keys are the scheduler's config options
    (unknown ones are errors) or its step's ``eta`` / ``use_clipped_model_output``; the betas come
    from ``path``.
    """
    head, *parts = method.split(":")
    if head not in DIFFUSERS_SOLVERS:
        raise UserError(f"unknown diffusers solver {head!r}; expected one of {tuple(DIFFUSERS_SOLVERS)}")
    if not isinstance(path, DDPM):
        raise UserError(
            f"solver {method!r} is diffusers' integer-timestep loop: it needs a DDPM path, got {path.name!r}"
        )
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UserError(f"solver {method!r}: {part!r} is not key=value")
        options[key.strip()] = _option_value(value)
    for key in _PATH_OPTIONS:
        if key in options:
            raise UserError(
                f"solver {method!r}: {key} is set by the teacher's DDPM path, not the solver name"
            )
    eta = options.pop("eta", None)
    clipped = bool(options.pop("use_clipped_model_output", False))
    cls = DIFFUSERS_SOLVERS[head]
    betas = {
        "num_train_timesteps": path.num_train_timesteps,
        "beta_start": path.beta_start,
        "beta_end": path.beta_end,
        "beta_schedule": path.schedule,
    }
    cfg = read_scheduler_config({**betas, **options}, cls, what=f"solver {method!r}")
    return cfg, (None if eta is None else float(eta)), clipped


@partial(jax.jit, static_argnames=("scfg", "nfe", "eta", "clipped", "kind", "guidance"))
def _scheduler_solve(teacher, x, noises, scfg, nfe, eta, clipped, kind, label=None, guidance=1.0):
    path = teacher.path

    def model_fn(xx, k):
        t = jnp.full((xx.shape[0],), path.timestep_to_t(k), jnp.float32)
        p = teacher.predict(xx, t, label, guidance)
        return path.convert(p, teacher.prediction, kind, xx, t)

    return scfg.sample(model_fn, x, nfe, eta=eta, noises=noises, use_clipped_model_output=clipped)


def diffusers_sampler(
    teacher,
    method: str,
    batch_size: int = 1000,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
    seed: int = 0,
):
    """The sampler ``x1, nfe -> x0`` of a diffusers solver name (see :func:`diffusers_scheduler`):
    ``nfe`` scheduler steps, one model call each (None where the scheduler refuses that many).

    diffusers starts from ``randn`` latents (``init_noise_sigma = 1``); the table's noise is
    ``x1 = sigma(1) eps``, so the loop starts from ``x1 / sigma(1)``, the latents a diffusers user
    draws. Re-noising (DDIM eta > 0, LCM, TCD gamma > 0) is drawn from ``seed``, per batch.
    """
    scfg, eta, clipped = diffusers_scheduler(method, teacher.path)
    kind = _KINDS[scfg.prediction_type]
    scale = 1.0 / teacher.path.prior_scale

    def sampler(x1, nfe):
        try:
            scfg.timesteps(nfe)
        except ValueError:  # more steps than the scheduler's schedule offers
            return None
        out = []
        for i in range(0, len(x1), batch_size):
            xb = jnp.asarray(x1[i : i + batch_size]) * scale
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            noises = jax.random.normal(key, (nfe, *xb.shape), jnp.float32)
            lab = condition_rows(label, i, i + batch_size)
            y = _scheduler_solve(teacher, xb, noises, scfg, nfe, eta, clipped, kind, lab, float(guidance))
            out.append(np.asarray(y))
        return np.concatenate(out)

    return sampler


def solver_samplers(
    teacher,
    methods,
    grid_kind: str,
    batch_size: int = 1000,
    euler_into_data: bool = False,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
) -> dict:
    """The teacher's fixed-step solvers as samplers: ``x1, nfe -> x0`` (None when nfe does not divide),
    conditioned on ``label`` (N,, aligned with ``x1``) at the CFG scale ``guidance`` when given.

    With ``euler_into_data`` (ideal-denoiser teachers) Heun / RK4's last step is Euler, so their
    true NFE is one (Heun) or three (RK4) below the nominal ``nfe`` they are listed at.
    ``diffusers_*`` methods (module docstring) are diffusers' integer loops (never at t = 0, where an
    ideal denoiser is singular); on a path other than DDPM they give no rows."""

    def make(method):
        if is_diffusers_solver(method):
            if not isinstance(teacher.path, DDPM):  # a table over several paths: rows on DDPM ones only
                diffusers_scheduler(method, DDPM())  # a bad name is still an error
                return lambda x1, nfe: None
            return diffusers_sampler(teacher, method, batch_size, label, guidance)
        if method not in solvers.NFE_PER_STEP:
            raise UserError(
                f"unknown teacher solver {method!r}; expected one of {solvers.FIXED_STEP_SOLVERS} "
                f"or {'|'.join(DIFFUSERS_SOLVERS)}[:key=value...]"
            )

        def sampler(x1, nfe):
            per = solvers.NFE_PER_STEP[method]
            if nfe % per:
                return None
            grid = solvers.make_grid(grid_kind, nfe // per, teacher.path)
            return solve_batched(teacher, x1, grid, method, batch_size, euler_into_data, label, guidance)

        return sampler

    return {m: make(m) for m in methods}


def evaluate_teacher_solvers(
    testbed: ExactTestbed,
    nfes=(1, 2, 4, 8, 16, 32, 64),
    methods=("euler", "heun", "rk4", "dpmpp_2m"),
    num_samples: int = 2000,
    seed: int = 0,
    grid: str = "auto",
    batch_size: int = 1000,
    log=print,
    keep: dict | None = None,
) -> dict:
    """Runs the table on one testbed; returns ``{"rows": [...], "reference": {...}}``.

    With ``keep`` (a dict), samples at NFE 1, 2, 4, 8 land in ``keep[method][nfe]``, the reference
    flow map in ``keep["teacher (converged)"]`` and 2-D teacher trajectories in ``keep["_trajectories"]``.
    """
    teacher = testbed.teacher
    grid_kind = default_grid(teacher.path.name) if grid == "auto" else grid
    ref = make_reference(testbed, num_samples, seed, batch_size)
    log(
        f"[{testbed.name}] reference flow map: adaptive RK45, {ref.nfe} NFE, "
        f"mse vs a tighter solve {ref.mse_vs_tighter:.2e}"
    )
    rows = reference_rows(testbed, ref, seed)
    samplers = solver_samplers(
        teacher, methods, grid_kind, batch_size, euler_into_data=testbed.singular_at_data
    )
    rows += evaluate_samplers(testbed, samplers, nfes, ref, log, keep=keep, keep_nfes=(1, 2, 4, 8))
    # straightness of the teacher's trajectories (docs/methods.md §5.1), on a fine RK4 grid
    g = solvers.make_grid(grid_kind, 32, teacher.path)
    _, traj = teacher.solve(jnp.asarray(ref.x1[:500]), g, "rk4", return_trajectory=True)
    if keep is not None:
        keep["teacher (converged)"] = {"exact": ref.x0}
        keep["_trajectories"] = {"teacher ODE (RK4, 32 steps)": np.asarray(traj)}
    reference = {
        "solver": "dopri5",
        "nfe": ref.nfe,
        "mse_vs_tighter": ref.mse_vs_tighter,
        "grid": grid_kind,
        "straightness": sample_distances.straightness(np.asarray(traj), g),
        "seconds": ref.seconds,
    }
    return {"rows": rows, "reference": reference}


__all__ = [
    "DIFFUSERS_SOLVERS",
    "diffusers_sampler",
    "diffusers_scheduler",
    "evaluate_teacher_solvers",
    "is_diffusers_solver",
    "solve_batched",
    "solver_samplers",
]
