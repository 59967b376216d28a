"""The distillation quality table: recipes x testbeds at equal budget, beside the teacher.

    python -m fewstep_jax.bench.distill --testbeds=gmm8,checker --recipes=traflow,cd,ctm \
        --steps=2000 --out=bench_results/distill_trajectory.json

For every testbed one evaluation noise and one exact reference are shared by every row. Each
recipe (configs/recipes) is trained with the same number of student steps and batch, then scored
at NFE 1, 2, 4 (flow-map MSE and sample distances) beside the teacher's Euler / Heun / DPM++(2M)
at the same NFE and the converged teacher; its cost (steps, wall time) is in the row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from fewstep_jax.bench.solvers import machine
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.evaluation.distill_eval import evaluate_distilled
from fewstep_jax.evaluation.scoring import make_reference
from fewstep_jax.evaluation.tables import markdown_table, write_json


def load_distill_config(testbed: str, recipe: str, steps: int | None, overrides: dict | None = None):
    """``configs/distill.py:<testbed>,<recipe>[,<steps>]`` from the repository root, plus overrides."""
    sys.path.insert(0, os.getcwd())
    from configs.distill import get_config

    c = get_config(f"{testbed},{recipe}" + (f",{steps}" if steps else ""))
    for k, v in (overrides or {}).items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def run(
    testbeds, recipes, steps=None, out="bench_results/distill.json", workdir_root=None, log=print
) -> dict:
    from fewstep_jax.train.loop import distill, make_testbed_from_config

    root = workdir_root or tempfile.mkdtemp(prefix="fewstep_bench_")
    results, t0 = {}, time.time()
    for tb in testbeds:
        rows, ref, testbed = [], None, None
        for i, recipe in enumerate(recipes):
            c = load_distill_config(tb, recipe, steps)
            if testbed is None:
                testbed = make_testbed_from_config(c)
                ref = make_reference(testbed, int(c.eval.num_samples), int(c.seed), int(c.eval.batch_size))
            log(f"== {tb} / {recipe}: {c.train.num_steps} steps at batch {c.train.batch_size}")
            d = distill(c, os.path.join(root, f"{tb}_{recipe}"), evaluate=False)
            rs = evaluate_distilled(
                c,
                d.student,
                d.params(),
                testbed,
                ref=ref,
                log=log,
                teacher_solvers=("euler", "heun", "dpmpp_2m") if i == 0 else (),
            )
            for r in rs:
                if r["method"].startswith(recipe):
                    r.update(
                        steps=int(c.train.num_steps),
                        batch=int(c.train.batch_size),
                        train_seconds=round(d.train_seconds, 1),
                    )
            rows += [r for r in rs if i == 0 or r["method"].startswith(recipe)]
        cols = ["method", "nfe", "flow_map_mse", *testbed.distance_names, "steps", "train_seconds"]
        print(f"\n### {tb}\n" + markdown_table(rows, cols))
        results[tb] = {"rows": rows, "reference_nfe": ref.nfe}
    payload = {"machine": machine(), "seconds": time.time() - t0, "steps": steps, "testbeds": results}
    write_json(out, payload)
    print(f"wrote {out} ({payload['seconds']:.0f} s on {payload['machine']})")
    return payload


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", default="gmm8,checker,gmm_hd")
    ap.add_argument("--recipes", default="traflow,cd,ctm")
    ap.add_argument("--steps", type=int, default=None, help="student steps per recipe (default: testbed's)")
    ap.add_argument("--out", default="bench_results/distill.json")
    ap.add_argument("--workdir_root", default=None)
    a = ap.parse_args(argv)
    return run(as_tuple(a.testbeds), as_tuple(a.recipes), a.steps, a.out, a.workdir_root)


if __name__ == "__main__":
    main()
