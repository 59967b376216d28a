"""The teacher-solver table: flow-map error and sample distance of every solver at every NFE.

This is the baseline every student is measured against (same noise, same reference, same
metrics): rows ``{testbed, method, nfe, flow_map_mse, <distances>}`` plus two reference rows, the
converged teacher (the adaptive reference flow map itself) and, for mixtures, fresh exact data
samples of the same size (the finite-sample floor of the distance).
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.evaluation import metrics
from fewstep_jax.testbeds import Testbed, reference_flow_map


def default_grid(path_name: str) -> str:
    """Uniform time steps for rectified flow, the EDM rho-grid for diffusion paths."""
    return "uniform" if path_name == "rf" else "edm"


@partial(jax.jit, static_argnames=("method",))
def _solve(teacher, x, grid, method):
    return teacher.solve(x, grid, method)


def solve_batched(teacher, x1: np.ndarray, grid: np.ndarray, method: str, batch_size: int) -> np.ndarray:
    """A fixed-step solve of (N, ...) noise in batches (the teacher passed as a jit argument)."""
    out = [
        np.asarray(_solve(teacher, jnp.asarray(x1[i : i + batch_size]), jnp.asarray(grid), method))
        for i in range(0, len(x1), batch_size)
    ]
    return np.concatenate(out)


def evaluate_teacher_solvers(
    testbed: Testbed,
    nfes=(1, 2, 4, 8, 16, 32, 64),
    methods=("euler", "heun", "rk4", "dpmpp_2m"),
    num_samples: int = 2000,
    seed: int = 0,
    grid: str = "auto",
    batch_size: int = 1000,
    log=print,
) -> dict:
    """Runs the table on one testbed; returns ``{"rows": [...], "reference": {...}}``."""
    teacher = testbed.teacher
    grid_kind = default_grid(teacher.path.name) if grid == "auto" else grid
    x1 = np.asarray(teacher.prior(jax.random.PRNGKey(seed), num_samples))
    t0 = time.time()
    ref, ref_nfe = reference_flow_map(teacher, x1, batch_size=batch_size)
    # accuracy of the reference: against a 10x tighter tolerance on a subset
    n_chk = min(200, num_samples)
    tight, _ = reference_flow_map(teacher, x1[:n_chk], rtol=1e-6, atol=1e-6, batch_size=batch_size)
    ref_err = metrics.flow_map_error(ref[:n_chk], tight)
    log(
        f"[{testbed.name}] reference flow map: adaptive RK45, {ref_nfe} NFE, "
        f"mse vs a tighter solve {ref_err:.2e}"
    )

    rows = []
    converged = {
        "testbed": testbed.name,
        "method": "teacher (converged)",
        "nfe": ref_nfe,
        "flow_map_mse": 0.0,
    }
    converged.update(testbed.distances(ref))
    rows.append(converged)
    if not testbed.is_image:
        fresh = testbed.sample_data(np.random.default_rng(seed + 1), num_samples)["x"]
        floor = {
            "testbed": testbed.name,
            "method": "data (same size)",
            "nfe": 0,
            "flow_map_mse": float("nan"),
        }
        floor.update(testbed.distances(fresh))
        rows.append(floor)
    for method in methods:
        for nfe in nfes:
            per = solvers.NFE_PER_STEP[method]
            if nfe % per:
                continue
            steps = nfe // per
            g = solvers.make_grid(grid_kind, steps, teacher.path)
            y = solve_batched(teacher, x1, g, method, batch_size)
            row = {"testbed": testbed.name, "method": method, "nfe": nfe}
            row["flow_map_mse"] = metrics.flow_map_error(y, ref) if np.isfinite(y).all() else float("nan")
            row.update(testbed.distances(y))
            rows.append(row)
            log(
                f"[{testbed.name}] {method:9s} NFE {nfe:3d}: mse {row['flow_map_mse']:.3g} "
                + " ".join(f"{k} {row[k]:.3g}" for k in testbed.distance_names)
            )
    # straightness of the teacher's trajectories (METHODS.md 5.1), on a fine RK4 grid
    g = solvers.uniform_grid(32) if grid_kind == "uniform" else solvers.make_grid(grid_kind, 32, teacher.path)
    _, traj = teacher.solve(jnp.asarray(x1[: min(500, num_samples)]), g, "rk4", return_trajectory=True)
    reference = {
        "solver": "dopri5",
        "nfe": ref_nfe,
        "mse_vs_tighter": ref_err,
        "grid": grid_kind,
        "straightness": metrics.straightness(np.asarray(traj), g),
        "seconds": time.time() - t0,
    }
    return {"rows": rows, "reference": reference}


def run_evaluate(config, workdir: str) -> dict:
    """Mode ``evaluate``: the solver table of the configured testbed -> workdir/solvers.{json,md}."""
    import os

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
    result = evaluate_teacher_solvers(
        testbed,
        as_tuple(ev.nfes, int),
        as_tuple(ev.solvers, str),
        ev.num_samples,
        config.seed,
        ev.grid,
        ev.batch_size,
    )
    cols = ["testbed", "method", "nfe", "flow_map_mse", *testbed.distance_names]
    table = markdown_table(result["rows"], cols)
    print(table)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "solvers.json"), result)
    with open(os.path.join(workdir, "solvers.md"), "w") as f:
        f.write(table + "\n")
    return result


__all__ = ["default_grid", "evaluate_teacher_solvers", "run_evaluate", "solve_batched"]
