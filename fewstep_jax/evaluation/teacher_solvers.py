"""The teacher-solver table: flow-map error and sample distance of every solver at every NFE.

This is the baseline every student is measured against (same noise, same reference, same
metrics): rows ``{testbed, method, nfe, flow_map_mse, <distances>}`` plus two reference rows, the
converged teacher (the adaptive reference flow map itself) and, for mixtures, fresh exact data
samples of the same size (the finite-sample floor of the distance).
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.evaluation import metrics
from fewstep_jax.evaluation.scoring import evaluate_samplers, make_reference, reference_rows
from fewstep_jax.solvers import default_grid
from fewstep_jax.testbeds import Testbed


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
    testbed: Testbed,
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
    # straightness of the teacher's trajectories (METHODS.md 5.1), on a fine RK4 grid
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
        "straightness": metrics.straightness(np.asarray(traj), g),
        "seconds": ref.seconds,
    }
    return {"rows": rows, "reference": reference}


def run_evaluate(config, workdir: str) -> dict:
    """Mode ``evaluate``: the solver table of the configured testbed -> workdir/solvers.{json,md}."""
    from fewstep_jax.config_utils import as_tuple
    from fewstep_jax.evaluation.tables import markdown_table, write_json
    from fewstep_jax.testbeds import make_testbed

    tb = config.testbed
    testbed = make_testbed(
        tb.name,
        tb.path,
        num_reference=tb.num_reference,
        seed=config.seed,
        mnist_path=tb.mnist_path or None,
        subset=tb.subset,
    )
    ev = config.eval
    keep: dict = {}
    result = evaluate_teacher_solvers(
        testbed,
        as_tuple(ev.nfes, int),
        as_tuple(ev.solvers, str),
        ev.num_samples,
        config.seed,
        ev.grid,
        ev.batch_size,
        keep=keep,
    )
    cols = ["testbed", "method", "nfe", "flow_map_mse", *testbed.distance_names]
    table = markdown_table(result["rows"], cols)
    print(table)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "solvers.json"), result)
    with open(os.path.join(workdir, "solvers.md"), "w") as f:
        f.write(table + "\n")
    _write_solver_report(workdir, testbed, result, keep, cols)
    return result


def _write_solver_report(workdir, testbed, result, keep, cols) -> str:
    from fewstep_jax.evaluation import report

    trajectories = keep.pop("_trajectories", {})
    converged = keep.pop("teacher (converged)")
    panels = {m: {n: x for n, x in by.items() if n <= 8} for m, by in keep.items()}
    panels["teacher (converged)"] = converged
    figs = {
        "Samples per NFE": report.plot_samples(
            panels,
            os.path.join(workdir, "samples.png"),
            reference=None if testbed.is_image else testbed.reference["x"],
        )
    }
    if not testbed.is_image:
        figs["Teacher trajectories"] = report.plot_trajectories(
            trajectories, os.path.join(workdir, "trajectories.png")
        )
    ref = result["reference"]
    notes = (
        f"Testbed `{testbed.name}` on the `{testbed.teacher.path.name}` path. Flow-map MSE is against "
        f"the exact flow map (adaptive RK45, {ref['nfe']} NFE, MSE {ref['mse_vs_tighter']:.1e} against "
        f"a 10x tighter solve); grid `{ref['grid']}`. Straightness of the teacher's trajectories: "
        f"{ref['straightness']:.3g} (0 = straight lines)."
    )
    return report.write_report(
        workdir, f"Teacher solvers on {testbed.name}", result["rows"], cols, figs, notes
    )


__all__ = [
    "evaluate_teacher_solvers",
    "run_evaluate",
    "solve_batched",
    "solver_samplers",
]
