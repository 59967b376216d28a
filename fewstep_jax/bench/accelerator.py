"""One accelerator benchmark: MNIST teacher -> TraFlow / TCD / TDM students, and the CIFAR-10 step.

    python -m fewstep_jax.bench.accelerator --mnist=PATH/mnist.npz --out=DIR [--budget=full|tiny]
        [--teacher_steps=N --teacher_batch=B --student_steps=N --student_batch=B --samples=N
         --timing_steps=N --timing_batch=B --recipes=traflow,tcd,tdm_unify_l2 --accelerator=NAME]

Nothing is downloaded (MNIST comes from ``--mnist``, the FD classifier is the packaged
``fewstep_jax/assets/mnist_classifier.npz``) and nothing beyond jax, flax, optax, orbax and
ml-collections is needed for the path itself. Three parts, each timed:

1. Teacher: ``recipes.experiments.mnist_teacher()`` (what ``configs/mnist_teacher.py`` runs) trained by
   ``modes.train_teacher`` with ``--teacher_steps`` at ``--teacher_batch`` (the README's longer
   recipe, 20000 x 128, by default) into ``DIR/teacher``. Its loss curve is recorded with the
   ``tail_change``: mean loss over the last 10% of the logged steps relative to the 10% before
   (a value within the curve's noise says fewer steps would have done).
2. Students: :func:`fewstep_jax.bench.distill.run` on that teacher, one equal budget
   (``--student_steps`` x ``--student_batch``) per recipe: ``traflow``, ``tcd`` and
   ``tdm_unify_l2`` (TDM's best on this teacher: steps-aware, squared distance; README "Distilling
   the trained MNIST teacher", ``bench_results/distill_mnist_50.md``), scored at NFE 1 / 2 / 4 beside
   the teacher's Euler / Heun / DPM-Solver++(2M) on ``--samples`` class-balanced noises (pooled FD
   in the MNIST classifier's features, flow-map MSE against the teacher's adaptive solve, as the
   CPU tables). The harness writes ``DIR/distill.{json,md}`` and keeps the runs in ``DIR/runs``.
3. Step timing: the CIFAR-10 DDPM++ UNet teacher step (``recipes.experiments.cifar10_rf_teacher``,
   bfloat16 compute) at ``--timing_batch`` on the devices at hand: compile seconds, then the best of
   ``repeats`` windows of ``--timing_steps`` steps (``train_speed.time_steps``); FLOPs per step from
   the dry run's compile (``modes.dryrun.compile_step``) and MFU against the peak of
   ``dryrun.ACCELERATORS`` for ``jax.devices()[0].device_kind`` (``dryrun.assess``; none on a CPU).

``DIR/accelerator.json`` holds everything (``rows``: the students' and the teacher's rows of the
table); ``DIR/accelerator.md`` the table, with the command and the machine (device kind, jax
version) in its header; the table is printed too.

Budgets (``BUDGETS``; every flag above overrides its preset). The ``full`` defaults aim at about
4 minutes on one H100-class GPU; they are ESTIMATES from CPU measurements and FLOP counts until a
GPU run measures them (``accelerator.json`` records each part's seconds):

* FLOPs per step (XLA cost analysis of the compiled steps, ``compile_step`` on this CPU): MNIST
  teacher 1.37e11 at batch 128; students at batch 128: ``tcd`` 2.29e11, ``traflow`` 5.93e11 (a
  padded 8-jump Heun solve of the teacher: 17 teacher calls per example), ``tdm_unify_l2``
  6.84e11; the CIFAR-10 step 7.47e12 at batch 128 (``bench_results/dryrun.md``).
* CPU rates (README "Trained teachers", ``bench_results/train_speed.json``): the MNIST teacher
  step at batch 32 runs at 3.2-3.4 steps/s on 2 cores (about 100 examples/s); students at batch 32
  take 1.2-3.8 s per step (the MNIST distillation tables: 60 steps in 72-227 s with evaluation).
* GPU: a 1.1M-parameter UNet on 28x28 images keeps an H100 far below its peak (small convolutions,
  float32 = TF32 at 495 TFLOP/s); at an assumed 5-10% MFU the teacher step takes 3-6 ms (a
  ~300-1000x speed-up over the 2-core CPU per example), so 20000 steps take 1-2 minutes; the three
  students at ``student_steps=1000`` (5% of the teacher's steps, 4x the 250 steps x 32 of the CPU
  tables' longest students in examples x 4) about 30-60 s together, the sequential teacher calls of
  TraFlow's target being latency- rather than FLOP-bound; evaluation (reference RK45 at rtol 1e-3,
  about 63 NFE, on 2000 samples; 9 teacher-solver and 21 student sample sets) is cheap on a GPU
  but compiles one program per solver and NFE (tens of seconds together); the CIFAR-10 step is
  about 19 ms at 40% of the bf16 peak, so its compile (twice: timed step and dry-run FLOPs) costs
  more than its 3 x 20 timed steps.

``--budget=tiny`` runs the same path with a few teacher and student steps, 128 samples, shrunken
networks (MNIST UNet channels (8, 16), CIFAR UNet (32, 32), one layer per block) and a 2-step
timing, for a CPU smoke test (``tests/test_bench_accelerator.py``): its numbers are not results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path as FilePath

import ml_collections
import numpy as np

from fewstep_jax.evaluation.tables import markdown_table, pivot_markdown, write_json
from fewstep_jax.recipes import experiments

PROG = "python -m fewstep_jax.bench.accelerator"
RECIPES = ("traflow", "tcd", "tdm_unify_l2")
NFES = (1, 2, 4)
CURVE_POINTS = 200  # logged points of the teacher's loss curve
TAIL = 0.1  # fraction of the curve compared with the one before it (``tail_change``)
MAIN_DISTANCE = "fd_mnist"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of one benchmark run; the first seven are CLI flags."""

    teacher_steps: int
    teacher_batch: int
    student_steps: int
    student_batch: int
    samples: int  # evaluation noises of the distillation table
    timing_steps: int  # timed steps per window of the CIFAR-10 step
    timing_batch: int
    timing_repeats: int = 3  # windows, best kept (train_speed.time_steps)
    timing_warmup: int = 3
    reference_rtol: float = 1e-3  # the adaptive reference solve (as the MNIST CPU tables)
    teacher_eval_samples: int = 1000  # train_teacher's final evaluation (config eval.train_num_samples)
    teacher_eval_nfes: tuple[int, ...] = (1, 2, 4, 8, 16)
    num_reference: int = 10_000  # data images the distances compare against
    gammas: tuple[float, ...] | None = None  # student sampler gammas (None: each recipe's)
    mnist_model: dict = dataclasses.field(default_factory=dict)  # UNet overrides of teacher and students
    cifar_model: dict = dataclasses.field(default_factory=dict)  # UNet overrides of the timed step


FLAGS = (
    "teacher_steps",
    "teacher_batch",
    "student_steps",
    "student_batch",
    "samples",
    "timing_steps",
    "timing_batch",
)
BUDGETS = {
    "full": Budget(
        teacher_steps=20_000,
        teacher_batch=128,
        student_steps=1000,
        student_batch=128,
        samples=2000,
        timing_steps=20,
        timing_batch=128,
    ),
    # divisible by up to 8 host devices (the CLI splits the CPU as fewstep does)
    "tiny": Budget(
        teacher_steps=4,
        teacher_batch=16,
        student_steps=2,
        student_batch=16,
        samples=128,
        timing_steps=2,
        timing_batch=8,
        timing_repeats=1,
        timing_warmup=1,
        reference_rtol=1e-2,
        teacher_eval_samples=32,
        teacher_eval_nfes=(1, 2),
        num_reference=500,
        gammas=(0.0,),
        mnist_model={
            "block_out_channels": (8,),
            "down_block_types": ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",),
            "norm_num_groups": 8,
            "attention_head_dim": 8,
        },
        cifar_model={
            "block_out_channels": (32,),
            "down_block_types": ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",),
            "layers_per_block": 1,
            "attention_head_dim": 32,
        },
    ),
}


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def device_info() -> dict:
    """The first device's kind and platform, the device count and the jax version."""
    import jax

    from fewstep_jax.bench.solvers import machine

    d = jax.devices()[0]
    return {
        "device_kind": d.device_kind,
        "platform": d.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "host": machine(),
    }


def accelerator_for(device_kind: str):
    """The ``dryrun.ACCELERATORS`` entry of a ``jax.devices()[0].device_kind`` (None: unknown, e.g.
    a CPU). An H200 has the H100 SXM's compute peaks with 141 GB of HBM (NVIDIA H200 datasheet)."""
    from fewstep_jax.modes.dryrun import ACCELERATORS

    k = device_kind.lower()
    if "h200" in k:
        return dataclasses.replace(ACCELERATORS["h100_80gb"], name="h200_141gb", hbm_bytes=141e9)
    table = (
        ("h100", "h100_80gb"),
        ("a100" if "80gb" in k else "", "a100_80gb"),
        ("a100", "a100_40gb"),
        ("v6", "tpu_v6e"),
        ("v5 lite", "tpu_v5e"),
        ("v5e", "tpu_v5e"),
        ("v5", "tpu_v5p"),
        ("v4", "tpu_v4"),
    )
    return next((ACCELERATORS[name] for key, name in table if key and key in k), None)


# ---------------------------------------------------------------------------------------------
# 1. teacher
# ---------------------------------------------------------------------------------------------


def teacher_config(budget: Budget, mnist: str) -> ml_collections.ConfigDict:
    """The MNIST teacher config at the budget's steps, batch and evaluation size."""
    c = experiments.mnist_teacher()
    c.testbed.mnist_path = mnist
    c.testbed.num_reference = budget.num_reference
    c.train.num_steps = budget.teacher_steps
    c.train.batch_size = budget.teacher_batch
    c.train.log_every = max(1, budget.teacher_steps // CURVE_POINTS)
    c.train.checkpoint_every = budget.teacher_steps  # the final state only: no I/O in the timed loop
    c.eval.train_num_samples = budget.teacher_eval_samples
    c.eval.train_nfes = budget.teacher_eval_nfes
    for k, v in budget.mnist_model.items():
        c.model[k] = v
    return c


def loss_curve(metric_rows: list[dict]) -> list[list[float]]:
    """``[[step, loss], ...]`` of the logged training rows (those with a ``loss``)."""
    return [[int(r["step"]), float(r["loss"])] for r in metric_rows if "loss" in r and "step" in r]


def tail_change(curve: list[list[float]], tail: float = TAIL) -> float | None:
    """(mean loss of the last ``tail`` of the curve) / (mean of the ``tail`` before it) - 1; None
    with fewer than 2 points per window."""
    n = int(len(curve) * tail)
    if n < 2:
        return None
    loss = np.asarray([v for _, v in curve], np.float64)
    return float(loss[-n:].mean() / loss[-2 * n : -n].mean() - 1.0)


def train_mnist_teacher(c: ml_collections.ConfigDict, workdir: FilePath, log=print) -> dict:
    """Trains the teacher into ``workdir`` (resuming what is there); its cost, curve and final eval."""
    from fewstep_jax.main import save_config
    from fewstep_jax.modes.train_teacher import train_teacher
    from fewstep_jax.runs.writers import read_metrics

    resumed = (workdir / "checkpoints").exists()
    log(f"== teacher: {c.train.num_steps} steps at batch {c.train.batch_size} -> {workdir}")
    save_config(c, str(workdir))  # the harness reads the teacher's config.json
    t0 = time.time()
    train_teacher(c, str(workdir))
    wall = time.time() - t0
    curve = loss_curve(read_metrics(workdir))
    ev = json.loads((workdir / "teacher_eval.json").read_text())
    return {
        "workdir": str(workdir),
        "steps": int(c.train.num_steps),
        "batch": int(c.train.batch_size),
        "prediction": str(c.teacher.prediction),
        "wall_seconds": wall,
        "steps_per_wall_second": int(c.train.num_steps) / wall,
        "resumed": resumed,
        "final_loss": curve[-1][1] if curve else None,
        "tail_change": tail_change(curve),
        "loss_curve": curve,
        "eval": ev.get("eval", {}),
    }


# ---------------------------------------------------------------------------------------------
# 2. students
# ---------------------------------------------------------------------------------------------


def distill_students(
    budget: Budget,
    mnist: str,
    teacher: dict,
    out: FilePath,
    recipes,
    command: str,
    log=print,
) -> dict:
    """The harness's table of ``recipes`` from the trained teacher (``out/distill.{json,md}``)."""
    from fewstep_jax.bench import distill as harness

    sets = {
        # a student initialised from the teacher must read its output as the teacher does: TCD's
        # recipe reads it as v (made for a VP teacher), which turns a flow teacher's copied
        # params into another map (the tiny run: flow-map MSE 1.03 at 1 NFE vs the teacher's
        # Euler 0.047); a no-op for traflow and tdm*, whose students predict flow already
        "student.prediction": teacher["prediction"],
        "testbed.mnist_path": mnist,
        "testbed.num_reference": budget.num_reference,
        "train.main_start": 0,  # TDM's fake score starts from the teacher: no warm-up
        "train.batch_size": budget.student_batch,
        "eval.num_samples": budget.samples,
        "eval.batch_size": min(budget.samples, 1000),
    }
    return harness.run(
        ("mnist",),
        tuple(recipes),
        budget.student_steps,
        str(out / "distill.json"),
        str(out / "runs"),
        log,
        teacher_workdir=teacher["workdir"],
        sets=sets,
        nfes=NFES,
        gammas=budget.gammas,
        pooled=True,  # 128-2000 samples: a Frechet distance per class would rest on too few
        reference_rtol=budget.reference_rtol,
        command=f"{command}  # part 2 of 3",
    )


# ---------------------------------------------------------------------------------------------
# 3. step timing
# ---------------------------------------------------------------------------------------------


def timing_config(budget: Budget, accelerator) -> ml_collections.ConfigDict:
    """The CIFAR-10 RF teacher config (bf16 compute) on the devices at hand at the timing batch; the
    dry-run block set to this machine (``step_time`` filled in after timing)."""
    from fewstep_jax.recipes.experiments import cifar10_rf_teacher

    c = ml_collections.ConfigDict(cifar10_rf_teacher().to_dict())
    c.model.dtype = "bfloat16"
    for k, v in budget.cifar_model.items():
        c.model[k] = v
    c.train.batch_size = budget.timing_batch
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.dryrun.num_devices = 0  # the devices at hand
    if accelerator is not None:
        c.dryrun.accelerator = accelerator.name
    return c


def time_train_step(c: ml_collections.ConfigDict, budget: Budget, accelerator) -> dict:
    """Compile seconds and steps/s of the real train step of ``c`` on random images; FLOPs per step
    from ``dryrun.compile_step`` and, on a known accelerator, the MFU ``dryrun.assess`` implies."""
    import jax

    from fewstep_jax import parallel
    from fewstep_jax.bench.train_speed import time_steps
    from fewstep_jax.modes.dryrun import assess, compile_step, data_shape
    from fewstep_jax.train.networks import teacher_network
    from fewstep_jax.train.state import create_state
    from fewstep_jax.train.step import make_train_step, state_shardings

    shape = data_shape(c.model)
    mesh = parallel.make_mesh(int(c.mesh.data), int(c.mesh.fsdp))
    net = teacher_network(c, shape)
    create = lambda: create_state(c, net.init)
    shardings = state_shardings(jax.eval_shape(create), mesh, int(c.mesh.min_shard_size))
    state = jax.jit(create, out_shardings=shardings)()
    step = make_train_step(c, net.student, {}, mesh=mesh, state_sharding=shardings)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (int(c.train.batch_size), *shape)).astype(np.float32)
    batch = parallel.global_batch({"x": x}, mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], None, batch)
        return metrics

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - t0
    for _ in range(budget.timing_warmup):
        run()
    jax.block_until_ready(holder["state"])
    speed, _ = time_steps(run, jax.block_until_ready, budget.timing_steps, budget.timing_repeats)
    measured, abstract = compile_step(c)
    out = {
        "model": "CIFAR-10 DDPM++ UNet (cifar10_rf_teacher)" + (" shrunk" if budget.cifar_model else ""),
        "params": measured["params"],
        "batch": int(c.train.batch_size),
        "devices": jax.device_count(),
        "compute_dtype": measured["compute_dtype"],
        "compile_seconds": compile_s,
        "dryrun_compile_seconds": measured["compile_seconds"],
        "steps_per_s": speed,
        "examples_per_s": speed * int(c.train.batch_size),
        "flops_per_step": measured["flops_per_step"],
        "achieved_flops": measured["flops_per_step"] * speed,
        "accelerator": None,
        "peak_flops_per_chip": None,
        "mfu": None,
    }
    if accelerator is not None:
        c.dryrun.step_time = 1.0 / speed
        report = assess(measured, abstract, c, accelerator)
        out.update(accelerator=report["accelerator"], peak_flops_per_chip=report["peak_flops"])
        out["mfu"] = report["implied_mfu"]
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def table_rows(distill_payload: dict) -> list[dict]:
    """The students' and the teacher's rows of the harness's MNIST table."""
    return list(distill_payload["testbeds"]["mnist"]["rows"])


def markdown_report(p: dict) -> str:
    """``accelerator.md``: the command and machine, then one table per part."""
    m, t, s, tm = p["machine"], p["teacher"], p["students"], p["timing"]
    tiny = p["budget_name"] == "tiny"
    lines = [
        f"# Accelerator benchmark ({p['budget_name']} budget)",
        "",
        f"Command: `{p['command']}`",
        "",
        f"Machine: {m['device_kind']} ({m['platform']}, {m['device_count']} device(s)), jax {m['jax']}; "
        f"host {m['host']}. Total: {p['seconds']['total']:.0f} s (teacher {p['seconds']['teacher']:.0f}, "
        f"students {p['seconds']['students']:.0f}, step timing {p['seconds']['timing']:.0f}); "
        f"written {time.strftime('%Y-%m-%d %H:%M')}.",
    ]
    if tiny:
        lines += [
            "",
            "**Tiny budget: a smoke test of the path on shrunken networks; these numbers are not results.**",
        ]
    change = "n/a" if t["tail_change"] is None else f"{t['tail_change']:+.2%}"
    lines += [
        "",
        "## 1. MNIST teacher",
        "",
        markdown_table(
            [
                {
                    "steps": t["steps"],
                    "batch": t["batch"],
                    "wall_seconds": round(t["wall_seconds"], 1),
                    "steps/s (wall)": t["steps_per_wall_second"],
                    "final loss": t["final_loss"],
                    "tail change": change,
                }
            ],
            ["steps", "batch", "wall_seconds", "steps/s (wall)", "final loss", "tail change"],
        ),
        "",
        "Wall seconds include compilation and the final evaluation"
        f"{' (resumed run)' if t['resumed'] else ''}. "
        f"Tail change: mean loss over the last {TAIL:.0%} of the {len(t['loss_curve'])} logged steps vs the "
        f"{TAIL:.0%} before (the curve is in accelerator.json).",
    ]
    ref = s["reference"]
    rows = p["rows"]
    sampled = [r for r in rows if r["method"] not in ("teacher (converged)", "data (same size)")]
    nfes = sorted({r["nfe"] for r in sampled})
    lines += [
        "",
        f"## 2. Students: {', '.join(p['recipes'])}, {s['steps']} steps at batch {s['batch']}",
        "",
        f"{MAIN_DISTANCE} (FD in the MNIST classifier's features, "
        f"{ref['num_samples']} class-balanced samples, "
        f"pooled; lower is better); the converged teacher (adaptive RK45, {ref['nfe']} NFE) is the reference "
        "of the flow-map MSE. Full rows: distill.md.",
        "",
        pivot_markdown(sampled, MAIN_DISTANCE, nfes, index=("method",)),
        "",
        markdown_table(
            rows, ["method", "nfe", "flow_map_mse", MAIN_DISTANCE, "fd_pca", "steps", "batch", "wall_seconds"]
        ),
    ]
    mfu = "n/a (no peak for this device)" if tm["mfu"] is None else f"{tm['mfu']:.1%}"
    lines += [
        "",
        "## 3. Train-step speed",
        "",
        markdown_table(
            [{**tm, "mfu": mfu}],
            [
                "model",
                "params",
                "batch",
                "compute_dtype",
                "compile_seconds",
                "steps_per_s",
                "examples_per_s",
                "flops_per_step",
                "accelerator",
                "mfu",
            ],
        ),
        "",
        "FLOPs per step: XLA's cost analysis of the compiled step (modes/dryrun.py); MFU = FLOPs per step x "
        "steps/s / (devices x the chip's dense peak for the compute dtype).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def run(
    mnist: str,
    out: str,
    budget_name: str = "full",
    overrides: dict | None = None,
    recipes=RECIPES,
    accelerator: str | None = None,
    command: str | None = None,
    log=print,
) -> dict:
    """Runs the three parts and writes ``out/accelerator.{json,md}``; returns the payload."""
    from fewstep_jax.modes.dryrun import get_accelerator

    if budget_name not in BUDGETS:
        raise ValueError(f"--budget={budget_name!r}; expected one of {sorted(BUDGETS)}")
    if not os.path.isfile(mnist):
        raise FileNotFoundError(f"--mnist={mnist!r}: no such file (an .npz with x_train/y_train)")
    budget = dataclasses.replace(BUDGETS[budget_name], **{k: v for k, v in (overrides or {}).items() if v})
    info = device_info()
    acc = get_accelerator(accelerator) if accelerator else accelerator_for(info["device_kind"])
    mnist = os.path.abspath(mnist)
    root = FilePath(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    command = command or shlex.join([*PROG.split(), *sys.argv[1:]])
    t0 = time.time()
    teacher = train_mnist_teacher(teacher_config(budget, mnist), root / "teacher", log)
    t1 = time.time()
    dist = distill_students(budget, mnist, teacher, root, recipes, command, log)
    t2 = time.time()
    log(f"== step timing: CIFAR-10 UNet, batch {budget.timing_batch}")
    timing = time_train_step(timing_config(budget, acc), budget, acc)
    t3 = time.time()
    ref = dist["testbeds"]["mnist"]["reference"]
    payload = {
        "command": command,
        "machine": info,
        "budget_name": budget_name,
        "budget": dataclasses.asdict(budget),
        "recipes": list(recipes),
        "nfes": list(NFES),
        "seconds": {"teacher": t1 - t0, "students": t2 - t1, "timing": t3 - t2, "total": t3 - t0},
        "teacher": teacher,
        "students": {
            "steps": budget.student_steps,
            "batch": budget.student_batch,
            "reference": ref,
            "json": str(root / "distill.json"),
        },
        "timing": timing,
        "rows": table_rows(dist),
    }
    write_json(str(root / "accelerator.json"), payload)
    text = markdown_report(payload)
    (root / "accelerator.md").write_text(text)
    print(text)
    print(
        f"wrote {root / 'accelerator.json'} and {root / 'accelerator.md'} "
        f"({payload['seconds']['total']:.0f} s)"
    )
    return payload


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", required=True, help="MNIST .npz (x_train/y_train, as testbed.mnist_path)")
    ap.add_argument(
        "--out", required=True, help="folder of accelerator.{json,md}, distill.{json,md} and the runs"
    )
    ap.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    for k in FLAGS:
        ap.add_argument(
            f"--{k}",
            type=int,
            default=None,
            help=f"default: the budget's ({BUDGETS['full'].__dict__[k]} full)",
        )
    ap.add_argument("--recipes", default=",".join(RECIPES), help="distillation recipes (fewstep_jax/recipes)")
    ap.add_argument(
        "--accelerator",
        default=None,
        help="a dryrun.ACCELERATORS key for the MFU (default: from the device kind)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    return run(
        a.mnist,
        a.out,
        a.budget,
        {k: getattr(a, k) for k in FLAGS},
        tuple(r for r in a.recipes.split(",") if r),
        a.accelerator,
        shlex.join([*PROG.split(), *argv]),
    )


def _split_host_cpu() -> None:
    """Splits the host CPU into devices as ``fewstep`` does (``main.cpu_device_count``); before
    the backend starts, and only from the command line. Accelerators are unaffected."""
    import jax

    from fewstep_jax.main import cpu_device_count

    n = cpu_device_count(0, os.cpu_count(), os.environ.get("XLA_FLAGS", ""))
    if n is not None:
        jax.config.update("jax_num_cpu_devices", n)


if __name__ == "__main__":
    _split_host_cpu()
    main()
