"""Train-step speed: JAX (several XLA:CPU set-ups) against PyTorch eager on the same threads.

    python -m fewstep_jax.bench.train_speed --out=bench_results/train_speed.json [--quick]

The step is one flow-matching update (rectified flow: x_t = (1 - t) x0 + t eps, target
eps - x0, MSE, Adam lr 1e-4) of `build_model(mlp_config())` on 2-D data and of
`build_model(unet_config("mnist"))` on 28x28x1 images; the PyTorch side runs the same
architecture (diffusers `UNet2DModel(**diffusers_config(cfg))`, a torch mirror of the MLP), the
same loss and Adam, with `torch.set_num_threads` = the cores JAX uses.

Every (variant, model, batch size) case runs in its own subprocess, because XLA_FLAGS are read
once at start-up and because peak memory is the process's max RSS (`resource.getrusage`; the
CPU backend has no `memory_stats`) minus the RSS after imports. A case reports compile time
(first call, including tracing), then the best of `repeats` windows of `steps` timed steps after
warm-up (best, because the machine may be shared), as steps/s and examples/s, and "cores busy"
(process CPU time / wall time while timing: how many cores the step really kept busy). The ratio
column is steps/s over PyTorch eager's for the same model and batch size (> 1: faster than torch).
`--variants` picks the set (see VARIANTS; the XLA library flags and torch_compile are opt-in).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# name -> (framework, extra XLA_FLAGS, host device count, options)
VARIANTS: dict[str, dict[str, Any]] = {
    "jax": {"framework": "jax", "flags": [], "devices": 1},
    "jax_2dev": {"framework": "jax", "flags": [], "devices": 2},
    "jax_no_eigen_mt": {"framework": "jax", "flags": ["--xla_cpu_multi_thread_eigen=false"], "devices": 1},
    "jax_concurrency_sched": {
        "framework": "jax",
        "flags": ["--xla_cpu_enable_concurrency_optimized_scheduler=true"],
        "devices": 1,
    },
    "jax_onednn": {"framework": "jax", "flags": ["--xla_cpu_use_onednn=true"], "devices": 1},
    "jax_xnnpack": {"framework": "jax", "flags": ["--xla_cpu_use_xnnpack=true"], "devices": 1},
    "jax_fast_math": {"framework": "jax", "flags": ["--xla_cpu_enable_fast_math=true"], "devices": 1},
    "jax_2dev_concurrency_sched": {
        "framework": "jax",
        "flags": ["--xla_cpu_enable_concurrency_optimized_scheduler=true"],
        "devices": 2,
    },
    "jax_bf16": {"framework": "jax", "flags": [], "devices": 1, "dtype": "bfloat16"},
    "jax_2dev_bf16": {"framework": "jax", "flags": [], "devices": 2, "dtype": "bfloat16"},
    "torch_eager": {"framework": "torch"},
    "torch_eager_1thread": {"framework": "torch", "threads": 1},
    "torch_compile": {"framework": "torch", "compile": True},
}
# torch_compile is left out: inductor needs ~8 min to compile the UNet step on 2 cores.
DEFAULT_VARIANTS = (
    "torch_eager",
    "torch_eager_1thread",
    "jax",
    "jax_2dev",
    "jax_concurrency_sched",
    "jax_2dev_concurrency_sched",
    "jax_no_eigen_mt",
    "jax_bf16",
)
BATCH_SIZES = {"mlp": (256, 1024, 4096), "unet": (16, 32, 64)}
QUICK_BATCH_SIZES = {"mlp": (64,), "unet": (4,)}
LEARNING_RATE = 1e-4
FIELDS = (
    "variant",
    "framework",
    "model",
    "batch_size",
    "devices",
    "threads",
    "xla_flags",
    "params",
    "compile_s",
    "steps_per_s",
    "examples_per_s",
    "peak_rss_mb",
    "cores_busy",
    "loss",
)


def num_cores() -> int:
    """CPU cores this process may run on (what XLA:CPU's thread pool sizes itself to)."""
    return len(os.sched_getaffinity(0))


def model_config(model: str, dtype: str = "float32"):
    """The benchmarked model config: the project defaults, at the given compute dtype."""
    from fewstep_jax.models import mlp_config, unet_config

    if model == "mlp":
        cfg = mlp_config()
    elif model == "unet":
        cfg = unet_config("mnist")
    else:
        raise ValueError(f"model must be 'mlp' or 'unet', got {model!r}")
    cfg.dtype = dtype
    return cfg


def data_shape(model: str, batch: int) -> tuple[int, ...]:
    """Shape of one data batch: (B, 2) for the MLP, NHWC (B, 28, 28, 1) for the UNet."""
    return (batch, 2) if model == "mlp" else (batch, 28, 28, 1)


def rss_mb() -> float:
    """Max resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), seconds."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def time_steps(
    run: Callable[[], Any], sync: Callable[[Any], Any], steps: int, repeats: int
) -> tuple[float, float]:
    """(best steps/s over `repeats` windows of `steps` calls of `run`, mean cores busy).

    Cores busy = process CPU time / wall time over all windows: 2.0 means both cores worked.
    """
    best, wall, cpu = 0.0, 0.0, 0.0
    for _ in range(repeats):
        cpu0, start = cpu_seconds(), time.perf_counter()
        out = None
        for _ in range(steps):
            out = run()
        sync(out)
        elapsed = time.perf_counter() - start
        wall, cpu = wall + elapsed, cpu + cpu_seconds() - cpu0
        best = max(best, steps / elapsed)
    return best, cpu / wall


# ----------------------------------------------------------------------------------------- JAX


def jax_case(model: str, batch: int, spec: dict[str, Any], steps: int, warmup: int, repeats: int) -> dict:
    """Time the jitted, donated flow-matching step of one model and batch size."""
    import jax
    import jax.numpy as jnp
    import optax

    from fewstep_jax import parallel
    from fewstep_jax.models import build_model

    base_rss = rss_mb()
    devices = spec.get("devices", 1)
    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} host devices, got {jax.device_count()} (XLA_FLAGS?)")
    if batch % devices:
        raise ValueError(f"batch size {batch} is not divisible by {devices} devices")
    net = build_model(model_config(model, spec.get("dtype", "float32")))
    shape = data_shape(model, batch)
    key = jax.random.PRNGKey(0)
    x0 = jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1.0, maxval=1.0)
    params = net.init(key, x0[:1], jnp.zeros((1,)))["params"]
    tx = optax.adam(LEARNING_RATE)
    state = (params, tx.init(params))

    def loss_fn(p, x, rng):
        rng_t, rng_e = jax.random.split(rng)
        t = jax.random.uniform(rng_t, (x.shape[0],))
        eps = jax.random.normal(rng_e, x.shape)
        tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
        xt = (1.0 - tb) * x + tb * eps
        pred = net.apply({"params": p}, xt, t)
        return jnp.mean((pred - (eps - x)) ** 2)

    def step(state, x, rng):
        p, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(p, x, rng)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    if devices > 1:
        mesh = parallel.make_mesh(data=-1)
        rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        state = jax.device_put(state, rep)
        x0 = jax.device_put(x0, data)
        key = jax.device_put(key, rep)
        train_step = jax.jit(step, donate_argnums=0, in_shardings=(rep, data, rep), out_shardings=(rep, rep))
    else:
        train_step = jax.jit(step, donate_argnums=0)

    start = time.perf_counter()
    state, loss = train_step(state, x0, key)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start

    holder = {"state": state, "key": key}

    def run():
        holder["key"], sub = jax.random.split(holder["key"])
        holder["state"], out = train_step(holder["state"], x0, sub)
        return out

    for _ in range(warmup):
        run()
    jax.block_until_ready(holder["state"])
    speed, busy = time_steps(run, jax.block_until_ready, steps, repeats)
    loss = float(run())
    return {
        "params": int(sum(v.size for v in jax.tree.leaves(params))),
        "compile_s": compile_s,
        "steps_per_s": speed,
        "peak_rss_mb": rss_mb() - base_rss,
        "cores_busy": busy,
        "loss": loss,
        "devices": devices,
        "threads": num_cores(),
    }


# --------------------------------------------------------------------------------------- torch


def torch_mlp(cfg: Any, dim: int):
    """Torch mirror of fewstep_jax.models.MLP (t-only conditioning), same layer sizes."""
    import math

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int, emb: int):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.dense1, self.dense2 = nn.Linear(width, width), nn.Linear(width, width)
            self.emb_proj = nn.Linear(emb, width)

        def forward(self, x, emb):
            h = self.dense1(nn.functional.silu(self.norm1(x))) + self.emb_proj(nn.functional.silu(emb))
            return x + self.dense2(nn.functional.silu(self.norm2(h)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w, e = cfg.width, cfg.emb_dim
            self.linear_1, self.linear_2 = nn.Linear(e, e), nn.Linear(e, e)
            self.input_proj = nn.Linear(dim, w)
            self.blocks = nn.ModuleList([Block(w, e) for _ in range(cfg.num_layers)])
            self.norm_out, self.output_proj = nn.LayerNorm(w), nn.Linear(w, dim)
            half = e // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            self.register_buffer("freqs", freqs)

        def forward(self, x, t):
            args = (t * cfg.time_scale)[:, None] * self.freqs[None]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            emb = self.linear_2(nn.functional.silu(self.linear_1(emb)))
            h = self.input_proj(x)
            for block in self.blocks:
                h = block(h, emb)
            return self.output_proj(nn.functional.silu(self.norm_out(h)))

    return Net()


def torch_case(model: str, batch: int, spec: dict[str, Any], steps: int, warmup: int, repeats: int) -> dict:
    """Time the same step in PyTorch (eager, or torch.compile when spec["compile"])."""
    import torch

    threads = int(spec.get("threads") or num_cores())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model == "unet":
        from diffusers import UNet2DModel

        from fewstep_jax.models import diffusers_config
    base_rss = rss_mb()
    cfg = model_config(model)
    shape = data_shape(model, batch)
    if model == "unet":
        net = UNet2DModel(**diffusers_config(cfg))
        forward = lambda x, t: net(x, t * cfg.time_scale).sample
        shape = (batch, 1, 28, 28)  # torch is NCHW
    else:
        net = torch_mlp(cfg, shape[-1])
        forward = net
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    x0 = torch.rand(shape) * 2.0 - 1.0

    def loss_step(x):
        t = torch.rand(x.shape[0])
        eps = torch.randn_like(x)
        tb = t.reshape((-1,) + (1,) * (x.dim() - 1))
        pred = forward((1.0 - tb) * x + tb * eps, t)
        loss = torch.mean((pred - (eps - x)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    run_step = torch.compile(loss_step) if spec.get("compile") else loss_step
    start = time.perf_counter()
    run_step(x0)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        run_step(x0)
    speed, busy = time_steps(lambda: run_step(x0), lambda out: None, steps, repeats)
    return {
        "params": int(sum(p.numel() for p in net.parameters())),
        "compile_s": compile_s,
        "steps_per_s": speed,
        "peak_rss_mb": rss_mb() - base_rss,
        "cores_busy": busy,
        "loss": float(run_step(x0)),
        "devices": 1,
        "threads": threads,
    }


# ------------------------------------------------------------------------------------- driver


def variant_env(spec: dict[str, Any], base_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a case subprocess: XLA_FLAGS of the variant (host device count included)."""
    env = dict(os.environ if base_env is None else base_env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if spec["framework"] == "jax":
        flags += list(spec.get("flags", ()))
        flags.append(f"--xla_force_host_platform_device_count={spec.get('devices', 1)}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_case(
    variant: str, model: str, batch: int, steps: int, warmup: int, repeats: int, timeout: float
) -> dict[str, Any]:
    """Run one case in a fresh subprocess; an error is recorded in the row, not raised."""
    spec = VARIANTS[variant]
    job = {"variant": variant, "model": model, "batch": batch, "steps": steps, "warmup": warmup}
    job["repeats"] = repeats
    env = variant_env(spec)
    row: dict[str, Any] = {k: None for k in FIELDS}
    row.update(variant=variant, framework=spec["framework"], model=model, batch_size=batch)
    row["xla_flags"] = env["XLA_FLAGS"] if spec["framework"] == "jax" else ""
    cmd = [sys.executable, "-m", "fewstep_jax.bench.train_speed", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timeout after {timeout:.0f} s"
        return row
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row["error"] = " | ".join(tail) or f"exit code {proc.returncode}"
        return row
    row.update(json.loads(lines[-1]))
    row["examples_per_s"] = row["steps_per_s"] * batch
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """`ratio_vs_torch_eager`: steps/s over torch eager's for the same model and batch size."""
    ref = {
        (r["model"], r["batch_size"]): r["steps_per_s"]
        for r in rows
        if r["variant"] == "torch_eager" and r.get("steps_per_s")
    }
    for r in rows:
        base = ref.get((r["model"], r["batch_size"]))
        r["ratio_vs_torch_eager"] = r["steps_per_s"] / base if base and r.get("steps_per_s") else None


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The README table: one line per case."""
    head = (
        "| model | batch | variant | compile s | steps/s | examples/s | peak RSS MB | cores busy "
        "| / torch eager |"
    )
    lines = [head, "|" + "---|" * 9]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    for r in rows:
        if r.get("error"):
            err = r["error"][:80]
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['variant']} | error: {err} ||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['variant']} | {fmt(r['compile_s'], '.1f')} | "
            f"{fmt(r['steps_per_s'], '.1f')} | {fmt(r['examples_per_s'], '.0f')} | "
            f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(r['cores_busy'], '.2f')} | "
            f"{fmt(r['ratio_vs_torch_eager'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/train_speed.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny batches and few steps (smoke test)")
    p.add_argument("--models", default="mlp,unet", help="comma list of mlp, unet")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--mlp_batch_sizes", default=None, help="comma list (default 256,1024,4096)")
    p.add_argument("--unet_batch_sizes", default=None, help="comma list (default 16,32,64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per window (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compile (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows, best kept (default 3)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case subprocess")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str | None, default: Sequence[int], what: str) -> list[int]:
    if text is None:
        return list(default)
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise ValueError(f"--{what} must be a comma list of integers, got {text!r}") from err
    if not values or min(values) <= 0:
        raise ValueError(f"--{what} must list positive integers, got {text!r}")
    return values


def worker(job_json: str) -> None:
    """Subprocess entry: run one case and print its result as one JSON line."""
    job = json.loads(job_json)
    spec = VARIANTS[job["variant"]]
    case = jax_case if spec["framework"] == "jax" else torch_case
    args = (job["model"], job["batch"], spec, job["steps"], job["warmup"], job["repeats"])
    print(json.dumps(case(*args)), flush=True)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every (model, batch size, variant) case, print the table, write the JSON."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return []
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in BATCH_SIZES:
            raise ValueError(f"--models: unknown model {m!r}; expected a subset of {sorted(BATCH_SIZES)}")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; known: {list(VARIANTS)}")
    sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    batch_sizes = {
        "mlp": _ints(args.mlp_batch_sizes, sizes["mlp"], "mlp_batch_sizes"),
        "unet": _ints(args.unet_batch_sizes, sizes["unet"], "unet_batch_sizes"),
    }
    steps = args.steps or (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)

    rows = []
    for model in models:
        for batch in batch_sizes[model]:
            for variant in variants:
                row = run_case(variant, model, batch, steps, warmup, repeats, args.timeout)
                rows.append(row)
                status = row.get("error") or f"{row['steps_per_s']:.2f} steps/s"
                print(f"[train_speed] {model} B={batch} {variant}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    print(markdown_table(rows))
    result = {
        "cores": num_cores(),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "quick": args.quick,
        "memory": "peak_rss_mb = getrusage max RSS of the case subprocess minus RSS after imports",
        "rows": rows,
    }
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
