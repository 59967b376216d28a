"""Dry run: compile a config's full-size train step for its mesh and report what it costs.

    python -m fewstep_jax.modes.dryrun --config=configs/cifar10_traflow.py        # simulated devices
    python -m fewstep_jax.main --config=configs/cifar10_traflow.py --config.mode=dryrun --workdir=w

Nothing full-size is materialised: the train state (and a distill run's teacher, built from
``config.dryrun.teacher_config``) is ``jax.eval_shape``'d, the sharded step of
``train/step.py`` is lowered on ``ShapeDtypeStruct`` arguments that carry their shardings and
compiled; XLA's ``memory_analysis()`` gives the bytes per device (arguments, outputs, aliased
(donated) and temporaries) and ``cost_analysis()`` the FLOPs per device of one step.

Devices. The run's slice has ``config.dryrun.num_devices`` chips laid out as ``config.mesh``
(data x fsdp). The step is compiled on the devices at hand (CPU devices simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or ``jax_num_cpu_devices``; the module's
CLI sets that up): with fewer devices than the slice, the mesh keeps its fsdp size and the
per-device batch and shrinks the data axis, which leaves the per-device memory and FLOPs
unchanged (data parallelism replicates; only the collectives' sizes differ). The FLOPs of a
global step are the per-device FLOPs times the slice's chip count.

Accelerators (``ACCELERATORS``; dense peak FLOP/s per chip, no sparsity; HBM per chip):
  TPU v4 275 TFLOP/s bf16, 32 GiB; v5e 197, 16 GiB; v5p 459, 95 GiB; v6e (Trillium) 918, 32 GiB
  (Google Cloud TPU "system architecture" pages). On TPU, JAX's default matmul precision
  computes float32 dots in one bfloat16 pass, so the float32 peak is taken equal to bf16.
  A100 40/80 GB: 312 TFLOP/s bf16, 156 TF32 (NVIDIA A100 datasheet, SXM); H100 80 GB (SXM):
  989 bf16, 495 TF32 (H100 datasheet). JAX uses TF32 for float32 dots/convs on these GPUs by
  default, so TF32 is the float32 peak. Which peak applies follows ``config.model.dtype``.
  HBM is the nominal capacity (GiB); ``config.dryrun.hbm_headroom`` (0.9) of it is the budget,
  the rest left to the runtime, fragmentation and XLA's own workspace.

Step time and MFU: ``t = flops_per_device / (mfu * peak)`` at the assumed ``config.dryrun.mfu``
(0.4: a typical well-fed conv UNet; an assumption, not a measurement); with a measured
``config.dryrun.step_time`` > 0 the report gives the MFU it implies, ``flops / (t * peak)``.
CPU-compiled FLOPs count the same convolutions and dots an accelerator runs; fusions and
layouts differ, so memory is XLA:CPU's buffer assignment (close to, not equal to, TPU/GPU).

When the bytes per device exceed the budget the run exits with the smallest ``mesh.fsdp`` and
the largest per-device batch that would fit, estimated from the measured split: the state
(params, EMA, optimizer) and one gradient-sized buffer scale with the fsdp sharding of each
leaf (``parallel.param_sharding``), activations linearly with the per-device batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import parallel
from fewstep_jax.errors import UserError, define_verbose_flag, parse_flags_or_exit, run_cli, unknown
from fewstep_jax.train import networks
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import make_train_step, state_shardings

GiB = 2**30
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16: float  # FLOP/s per chip, dense
    peak_fp32: float  # FLOP/s per chip for float32 compute at JAX's default precision
    hbm_bytes: float


ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("tpu_v4", 275e12, 275e12, 32 * GiB),
        Accelerator("tpu_v5e", 197e12, 197e12, 16 * GiB),
        Accelerator("tpu_v5p", 459e12, 459e12, 95 * GiB),
        Accelerator("tpu_v6e", 918e12, 918e12, 32 * GiB),
        Accelerator("a100_40gb", 312e12, 156e12, 40 * GiB),
        Accelerator("a100_80gb", 312e12, 156e12, 80 * GiB),
        Accelerator("h100_80gb", 989e12, 495e12, 80 * GiB),
    )
}

DRYRUN_DEFAULTS = {
    "accelerator": "a100_40gb",
    "num_devices": 0,  # 0: the devices at hand
    "teacher_config": "",
    "mfu": 0.4,
    "step_time": 0.0,
    "hbm_headroom": 0.9,
}


class DoesNotFitError(RuntimeError):
    """The step needs more bytes per device than the accelerator's HBM budget."""


def get_accelerator(name: str, custom: Accelerator | None = None) -> Accelerator:
    if custom is not None:
        return custom
    if name not in ACCELERATORS:
        raise unknown("dryrun.accelerator", name, ACCELERATORS)
    return ACCELERATORS[name]


def dryrun_settings(config: ml_collections.ConfigDict) -> dict:
    """``config.dryrun`` over ``DRYRUN_DEFAULTS`` (a config without the block gets the defaults)."""
    given = dict(config.get("dryrun", {}) or {})
    unknown = sorted(set(given) - set(DRYRUN_DEFAULTS))
    if unknown:
        raise UserError(f"config.dryrun: unknown keys {unknown}; known: {sorted(DRYRUN_DEFAULTS)}")
    return {**DRYRUN_DEFAULTS, **given}


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config([arg])`` of a config file (``configs/x.py`` or ``configs/x.py:arg``)."""
    if ":" in path and arg is None:
        path, arg = path.split(":", 1)
    file = FilePath(path)
    if not file.is_absolute() and not file.exists():
        file = FilePath(__file__).resolve().parents[2] / path
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} not found (dryrun.teacher_config)")
    spec = importlib.util.spec_from_file_location(f"_dryrun_cfg_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def data_shape(model_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """NHWC shape of one image of a UNet config ((D,) is not a scale config)."""
    if model_cfg.get("name") != "unet":
        raise UserError(f"the dry run needs an image model (name 'unet'), got {model_cfg.get('name')!r}")
    s = int(model_cfg.sample_size)
    return (s, s, int(model_cfg.in_channels))


def _abstract_teacher(tcfg: ml_collections.ConfigDict):
    """The neural teacher of a teacher config with abstract (ShapeDtypeStruct) params."""
    from fewstep_jax.teachers.neural import neural_teacher

    shape = data_shape(tcfg.model)
    net = networks.teacher_network(tcfg, shape)
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0))
    nc = int(tcfg.model.get("num_classes", 0))
    return neural_teacher(tcfg.model, params, tcfg.testbed.path, tcfg.teacher.prediction, shape, nc)


def _override_models(config: ml_collections.ConfigDict, overrides: dict | None) -> None:
    for k, v in (overrides or {}).items():
        config.model[k] = v
        for _, acfg in config.aux_nets.items():
            if "model" in acfg:
                acfg.model[k] = v


def _nets_and_state(config: ml_collections.ConfigDict, shape: tuple[int, ...], overrides: dict | None = None):
    """(main Net, aux Nets, teacher or None, abstract TrainState) of a train_teacher or distill run."""
    if config.mode == "train_teacher":
        net = networks.teacher_network(config, shape)
        state = jax.eval_shape(lambda: create_state(config, net.init))
        return net, {}, None, state
    if config.mode != "distill":
        raise UserError(f"the dry run covers modes train_teacher and distill, got mode={config.mode!r}")
    tfile = dryrun_settings(config)["teacher_config"]
    if not tfile:
        raise UserError("a distill dry run needs config.dryrun.teacher_config (the teacher's config file)")
    tcfg = load_config_file(tfile)
    _override_models(tcfg, overrides)
    teacher = _abstract_teacher(tcfg)
    if tuple(teacher.data_shape) != tuple(shape):
        raise UserError(f"teacher data shape {teacher.data_shape} differs from the student's {shape}")

    def create(tparams):
        # nets built on the traced teacher so init_from_teacher's shape checks run too
        main, aux = networks.distill_nets(config, teacher.replace(params=tparams), shape)
        return create_state(config, main.init, {n: a.init for n, a in aux.items()})

    state = jax.eval_shape(create, teacher.params)
    main, aux = networks.distill_nets(config, teacher, shape)
    return main, aux, teacher, state


def _batch_spec(config: ml_collections.ConfigDict, shape: tuple[int, ...], batch: int) -> dict:
    conditional = int(config.model.get("num_classes", 0)) > 0
    key = "noise" if config.mode == "distill" and config.student.data == "noise" else "x"
    spec = {key: jax.ShapeDtypeStruct((batch, *shape), jnp.float32)}
    if conditional:
        spec["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return spec


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def sharded_bytes(tree: Any, fsdp: int, min_size: int) -> int:
    """Bytes per device of a pytree under ``parallel.param_sharding`` with this fsdp size."""
    total = 0
    for x in jax.tree.leaves(tree):
        spec = parallel._leaf_spec(tuple(x.shape), fsdp, min_size)
        total += _nbytes(x) // (fsdp if any(a is not None for a in spec) else 1)
    return total


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest(report: dict, state: Any, budget: float) -> dict:
    """Smallest fsdp (dividing the slice's chips) and largest per-device batch that fit, by the
    linear model of the module docstring; values of None: no such setting."""
    n, f0, b0 = report["num_devices"], report["fsdp"], report["per_device_batch"]
    min_size = report["min_shard_size"]

    def fixed(f):  # state + one gradient-sized buffer + the replicated teacher
        return (
            sharded_bytes(state, f, min_size)
            + sharded_bytes(state.params, f, min_size)
            + report["teacher_bytes"]
        )

    act = max(0.0, (report["bytes_per_device"] - fixed(f0)) / b0)
    predict = lambda f, b: fixed(f) + act * b
    fsdp = next((f for f in _divisors(n) if f >= f0 and predict(f, b0) <= budget), None)
    batch = next((b for b in range(b0, 0, -1) if predict(f0, b) <= budget), None)
    both = None
    if fsdp is None and batch is None:
        both = next(
            ((f, b) for f in _divisors(n) if f >= f0 for b in range(b0, 0, -1) if predict(f, b) <= budget),
            None,
        )
    return {
        "fsdp": fsdp,
        "per_device_batch": batch,
        "fsdp_and_batch": both,
        "activation_bytes_per_sample": act,
    }


def dry_run(
    config: ml_collections.ConfigDict,
    accelerator: Accelerator | None = None,
    model_overrides: dict | None = None,
) -> dict:
    """Compiles the config's train step for its mesh; returns the report (bytes per device,
    FLOPs, implied step time/MFU, ``fits`` and, when it does not fit, ``suggestion``).

    accelerator: instead of ``config.dryrun.accelerator``. model_overrides: UNet fields set on
    every network of the run, the teacher's included (a quick check of a config's plumbing at a
    smaller size, e.g. ``{"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}``).
    """
    # a bad accelerator name fails before the compile
    get_accelerator(dryrun_settings(config)["accelerator"], accelerator)
    measured, state = compile_step(config, model_overrides)
    return assess(measured, state, config, accelerator)


def compile_step(config: ml_collections.ConfigDict, model_overrides: dict | None = None) -> tuple[dict, Any]:
    """``(measured, state)``: what the compiled step needs on any accelerator (bytes per device,
    FLOPs, params, mesh) and the abstract train state; :func:`assess` judges it on one."""
    settings = dryrun_settings(config)
    avail = jax.device_count()
    n = int(settings["num_devices"]) or avail
    fsdp = int(config.mesh.fsdp)
    data = int(config.mesh.data)
    if data == -1:
        if n % fsdp:
            raise UserError(f"mesh.fsdp={fsdp} does not divide dryrun.num_devices={n}")
        data = n // fsdp
    if data * fsdp != n:
        raise UserError(f"mesh data={data} x fsdp={fsdp} != dryrun.num_devices={n}")
    batch = int(config.train.batch_size)
    if batch % n:
        raise UserError(f"train.batch_size={batch} is not divisible by the {n} devices of the slice")
    per_device = batch // n
    if avail % fsdp:
        raise UserError(
            f"cannot simulate mesh.fsdp={fsdp} on {avail} devices: run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={max(fsdp, 8)} "
            "(python -m fewstep_jax.modes.dryrun does)"
        )
    sim = min(n, avail - avail % fsdp) if n >= fsdp else fsdp
    sim -= sim % fsdp
    cfg = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: the simulated batch
    cfg.train.batch_size = per_device * sim
    _override_models(cfg, model_overrides)
    mesh = jax.make_mesh(
        (sim // fsdp, fsdp),
        parallel.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:sim],
    )
    shape = data_shape(cfg.model)
    main, aux, teacher, state = _nets_and_state(cfg, shape, model_overrides)
    min_size = int(cfg.mesh.min_shard_size)
    shardings = state_shardings(state, mesh, min_size)
    step = make_train_step(
        cfg, main.student, {k: a.student for k, a in aux.items()}, mesh=mesh, state_sharding=shardings
    )
    with_sharding = lambda tree, s: jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, s
    )
    state_args = with_sharding(state, shardings)
    rep = parallel.replicated(mesh)
    teacher_args = (
        None
        if teacher is None
        else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), teacher)
    )
    batch_spec = _batch_spec(cfg, shape, per_device * sim)
    batch_args = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.batch_sharding(mesh)), batch_spec
    )
    t0 = time.time()
    # the LLVM optimisation level changes neither buffer assignment nor FLOPs, only compile time
    compiled = step.lower(state_args, teacher_args, batch_args).compile(compiler_options=COMPILER_OPTIONS)
    compile_seconds = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    used = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    teacher_bytes = 0 if teacher is None else sum(_nbytes(x) for x in jax.tree.leaves(teacher))
    measured = {
        "mode": cfg.mode,
        "method": cfg.get("method", ""),
        "num_devices": n,
        "simulated_devices": sim,
        "mesh": {"data": data, "fsdp": fsdp},
        "fsdp": fsdp,
        "min_shard_size": min_size,
        "global_batch": batch,
        "per_device_batch": per_device,
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "aux_params": {
            k: int(sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"])))
            for k, v in state.aux.items()
        },
        "teacher_params": 0
        if teacher is None
        else int(sum(math.prod(x.shape) for x in jax.tree.leaves(teacher))),
        "teacher_bytes": teacher_bytes,
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "bytes_per_device": int(used),
        "flops_per_device": flops,
        "flops_per_step": flops * n,
        "compute_dtype": "bfloat16" if cfg.model.get("dtype", "float32") == "bfloat16" else "float32",
        "compile_seconds": compile_seconds,
    }
    return measured, state


def assess(
    measured: dict, state: Any, config: ml_collections.ConfigDict, accelerator: Accelerator | None = None
) -> dict:
    """The report of a compiled step (:func:`compile_step`) on ``accelerator`` (default: the
    config's): HBM budget, peak FLOP/s, step time at the assumed MFU (or the MFU a measured
    ``dryrun.step_time`` implies), ``fits`` and, when it does not, ``suggestion``."""
    settings = dryrun_settings(config)
    acc = get_accelerator(settings["accelerator"], accelerator)
    peak = acc.peak_bf16 if measured["compute_dtype"] == "bfloat16" else acc.peak_fp32
    budget = float(settings["hbm_headroom"]) * acc.hbm_bytes
    flops, used = measured["flops_per_device"], measured["bytes_per_device"]
    report = {
        **measured,
        "accelerator": acc.name,
        "hbm_bytes": acc.hbm_bytes,
        "hbm_budget_bytes": budget,
        "peak_flops": peak,
        "assumed_mfu": float(settings["mfu"]),
        "step_seconds_at_mfu": flops / (float(settings["mfu"]) * peak),
    }
    if float(settings["step_time"]) > 0:
        report["measured_step_seconds"] = float(settings["step_time"])
        report["implied_mfu"] = flops / (float(settings["step_time"]) * peak)
    report["fits"] = used <= budget
    if not report["fits"]:
        report["suggestion"] = suggest(report, state, budget)
    return report


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_report(r: dict) -> str:
    lines = [
        f"dry run: {r['mode']} {r['method']}".rstrip() + f" on {r['num_devices']}x {r['accelerator']} "
        f"(mesh data={r['mesh']['data']} fsdp={r['mesh']['fsdp']}; "
        f"compiled on {r['simulated_devices']} devices)",
        f"  params {r['params'] / 1e6:.2f}M"
        + "".join(f", {k} {v / 1e6:.2f}M" for k, v in r["aux_params"].items())
        + (f", teacher {r['teacher_params'] / 1e6:.2f}M (replicated)" if r["teacher_params"] else ""),
        f"  batch {r['global_batch']} global, {r['per_device_batch']} per device",
        f"  per device: arguments {_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])}, "
        f"aliased {_gib(r['alias_bytes'])}, temporaries {_gib(r['temp_bytes'])}",
        f"  per device total {_gib(r['bytes_per_device'])} of {_gib(r['hbm_budget_bytes'])} budget "
        f"({_gib(r['hbm_bytes'])} HBM): {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs per step {r['flops_per_step']:.3e} ({r['flops_per_device']:.3e} per device)",
        f"  step time {r['step_seconds_at_mfu'] * 1e3:.1f} ms at an assumed MFU of {r['assumed_mfu']:.0%} "
        f"({r['compute_dtype']} peak {r['peak_flops'] / 1e12:.0f} TFLOP/s per chip)",
    ]
    if "implied_mfu" in r:
        lines.append(
            f"  measured step {r['measured_step_seconds'] * 1e3:.1f} ms implies MFU {r['implied_mfu']:.1%}"
        )
    lines.append(f"  compile {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def does_not_fit_message(r: dict) -> str:
    s = r["suggestion"]
    n = r["num_devices"]
    msg = [
        f"does not fit: {_gib(r['bytes_per_device'])} per device > {_gib(r['hbm_budget_bytes'])} "
        f"(the budget: {r['hbm_budget_bytes'] / r['hbm_bytes']:.0%} of {r['accelerator']}'s "
        f"{_gib(r['hbm_bytes'])} HBM)"
    ]
    if s["fsdp"] is not None:
        msg.append(f"  set --config.mesh.fsdp={s['fsdp']} --config.mesh.data={n // s['fsdp']} (estimate)")
    if s["per_device_batch"] is not None:
        msg.append(
            f"  or a per-device batch of {s['per_device_batch']}: --config.train.batch_size="
            f"{s['per_device_batch'] * n} on {n} chips (estimate)"
        )
    if s["fsdp_and_batch"] is not None:
        f, b = s["fsdp_and_batch"]
        msg.append(
            f"  set --config.mesh.fsdp={f} --config.mesh.data={n // f} "
            f"--config.train.batch_size={b * n} (estimate)"
        )
    if all(s[k] is None for k in ("fsdp", "per_device_batch", "fsdp_and_batch")):
        msg.append(
            f"  no fsdp size up to {n} nor any batch fits: use more chips or an accelerator with more HBM"
        )
    msg.append("  confirm with a dry run at the suggested setting")
    return "\n".join(msg)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Mode ``dryrun``: prints the report, writes ``<workdir>/dryrun.json``; exits with the
    FSDP/batch suggestion when the step does not fit the accelerator."""
    report = dry_run(config)
    if jax.process_index() == 0:
        print(format_report(report), flush=True)
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "dryrun.json"), "w") as f:
                json.dump(report, f, indent=1)
    exit_if_not_fit(report)
    return report


def exit_if_not_fit(report: dict) -> None:
    """SystemExit with the FSDP/batch suggestion when the report's step does not fit."""
    if not report["fits"]:
        raise SystemExit(does_not_fit_message(report))


def main(argv: list[str] | None = None) -> None:
    """CLI: simulates the slice's devices on CPU, then runs the dry run of ``--config``."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
    flags.DEFINE_string("workdir", "", "Where dryrun.json goes (optional).")
    flags.DEFINE_integer("devices", 0, "Simulated CPU devices (default: from the config's slice).")
    define_verbose_flag()
    flags.mark_flags_as_required(["config"])

    def _main(_):
        config = flags.FLAGS.config
        settings = dryrun_settings(config)
        n = flags.FLAGS.devices or min(int(settings["num_devices"]) or 8, max(8, int(config.mesh.fsdp)))
        # before the backend starts: the simulated devices live on the CPU
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
        run(config, flags.FLAGS.workdir)

    # a user error exits with one line (fewstep_jax.errors)
    app.run(lambda args: run_cli(_main, args), argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    main()
