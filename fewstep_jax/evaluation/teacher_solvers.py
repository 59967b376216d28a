"""The teacher-solver table: flow-map error and sample distance of every solver at every NFE.

This is the baseline every student is measured against (same noise, same reference, same
metrics): rows ``{testbed, method, nfe, flow_map_mse, <distances>}`` plus two reference rows, the
converged teacher (the adaptive reference flow map itself) and, for mixtures, fresh exact data
samples of the same size (the finite-sample floor of the distance).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.evaluation.scoring import evaluate_samplers, make_reference, reference_rows
from fewstep_jax.metrics import sample_distances
from fewstep_jax.solvers import default_grid
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
                None if label is None else jnp.asarray(label[i : i + batch_size], jnp.int32),
                float(guidance),
            )
        )
        for i in range(0, len(x1), batch_size)
    ]
    return np.concatenate(out)


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
    true NFE is one (Heun) or three (RK4) below the nominal ``nfe`` they are listed at."""

    def make(method):
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
    "evaluate_teacher_solvers",
    "solve_batched",
    "solver_samplers",
]
