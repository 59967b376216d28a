"""The teacher-solver benchmark: every solver at NFE 1..64 on every testbed, as a table + JSON.

    python -m fewstep_jax.bench.solvers --out=bench_results/solvers.json \
        [--testbeds=gmm8,checker,gmm_hd,digits,mnist] [--mnist=../shared/data/mnist.npz]

Rows: flow-map MSE against the adaptive reference ``Phi(x, 1, 0)`` and the testbed's sample
distances (SW2/MMD for 2-D and 8-D mixtures, Frechet distances in PCA / MNIST-classifier features
for images), beside the converged teacher and a same-size sample of the data itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

from fewstep_jax.evaluation.tables import markdown_table, pivot_markdown, write_json
from fewstep_jax.evaluation.teacher_solvers import evaluate_teacher_solvers
from fewstep_jax.testbeds.exact import make_testbed


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, jax {jax.__version__}"


def summary_markdown(payload: dict, nfes=(1, 2, 4, 8, 16, 32, 64)) -> str:
    """Per testbed: one line per solver, cells ``flow-map MSE / main distance`` per NFE."""
    out = []
    for name, res in payload["testbeds"].items():
        rows = res["rows"]
        main_d = next(k for k in ("sw2", "fd_mnist", "fd_pca") if k in rows[0])
        conv = next(r for r in rows if r["method"] == "teacher (converged)")
        out.append(
            f"**{name}**: flow-map MSE / {main_d}; converged teacher {main_d} = {conv[main_d]:.4g} "
            f"({conv['nfe']} NFE adaptive), straightness {res['reference']['straightness']:.3g}\n"
        )
        cells = [dict(r, cell=f"{r['flow_map_mse']:.2g} / {r[main_d]:.3g}") for r in rows if r["nfe"] in nfes]
        cells = [r for r in cells if r["method"] not in ("teacher (converged)", "data (same size)")]
        out.append(pivot_markdown(cells, "cell", nfes, index=("method",)) + "\n")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/solvers.json")
    ap.add_argument("--testbeds", default="gmm8,checker,gmm_hd,digits,mnist")
    ap.add_argument("--path", default="rf", help="interpolation path of the analytic teachers")
    ap.add_argument("--mnist", default="../shared/data/mnist.npz", help=".npz path ('' for tfds)")
    ap.add_argument("--nfes", default="1,2,4,8,16,32,64")
    ap.add_argument("--num_samples", type=int, default=2000)
    ap.add_argument("--num_image_samples", type=int, default=1000)
    args = ap.parse_args(argv)
    nfes = tuple(int(n) for n in args.nfes.split(","))
    results, rows, t0 = {}, [], time.time()
    for name in args.testbeds.split(","):
        tb = make_testbed(name, args.path, mnist_path=args.mnist or None)
        n = args.num_image_samples if tb.is_image else args.num_samples
        res = evaluate_teacher_solvers(tb, nfes=nfes, num_samples=n)
        results[name] = res
        rows += res["rows"]
        print(markdown_table(res["rows"], ["testbed", "method", "nfe", "flow_map_mse", *tb.distance_names]))
    payload = {"machine": machine(), "path": args.path, "seconds": time.time() - t0, "testbeds": results}
    write_json(args.out, payload)
    summary = summary_markdown(payload)
    with open(args.out.replace(".json", ".md"), "w") as f:
        f.write(
            f"`python -m fewstep_jax.bench.solvers` on {payload['machine']}, {payload['seconds']:.0f} s\n\n"
        )
        f.write(summary)
    print(summary)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s on {payload['machine']})")
    return payload


if __name__ == "__main__":
    main()
