"""Mode ``evaluate``: the teacher-solver table of an exact testbed (each solver at each NFE against
the exact flow map) -> ``workdir/solvers.{json,md}``, ``report.md`` and sample / trajectory plots."""

from __future__ import annotations

import os

from fewstep_jax.evaluation.teacher_solvers import evaluate_teacher_solvers


def run(config, workdir: str) -> dict:
    """Mode ``evaluate``: the solver table of the configured testbed -> workdir/solvers.{json,md}."""
    from fewstep_jax.config_utils import as_tuple
    from fewstep_jax.evaluation.tables import markdown_table, write_json
    from fewstep_jax.testbeds import make_testbed_from_config

    testbed = make_testbed_from_config(config)
    if not testbed.has_exact_teacher:
        raise ValueError(
            f"mode evaluate scores solvers against an exact flow map; testbed {testbed.name!r} is a real "
            "dataset with none (its teacher's samples are evaluated while it trains: mode train_teacher)"
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


__all__ = ["run"]
