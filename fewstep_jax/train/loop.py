"""The training loop (side effects at the edges).

``train`` runs any method: distributed set-up, mesh, global batches (a pure function of (seed,
step), so resuming needs only the step), state init or automatic resume, SIGTERM preemption,
periodic async checkpoints, metric writers and progress, periodic evaluation and, at the end, a
report. What to train, on what, and how to evaluate and report are the caller's (a mode of
:mod:`fewstep_jax.modes`): it passes the networks (``student_factory``), the teacher, the batches
(``data_source``), the evaluation (``eval_fn``) and the end-of-run report (``report_fn``), as
big_vision's trainers are handed their evaluators; the loop imports no evaluation code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Any

import jax
import ml_collections
import numpy as np

from fewstep_jax import parallel
from fewstep_jax.data import BatchSource
from fewstep_jax.runs import checkpoints, writers
from fewstep_jax.students import Student
from fewstep_jax.train.state import TrainState, create_state
from fewstep_jax.train.step import make_train_step, state_shardings

EvalFn = Callable[[TrainState, int], dict[str, float]]
# (workdir, the final evaluation's scalars) -> None, run on the main process after the last step
ReportFn = Callable[[FilePath, dict[str, float]], None]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the message names the step and the terms."""


@dataclasses.dataclass(frozen=True)
class Net:
    """A trained network: its wrapper and ``init(key) -> params``."""

    student: Student
    init: Callable[[jax.Array], Any]


StudentFactory = Callable[[ml_collections.ConfigDict], tuple[Net, dict[str, Net]]]


def host_tree(tree: Any) -> Any:
    """A (possibly sharded, multi-process) pytree as numpy arrays on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def _with_sharding(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _bad_terms(metrics: dict) -> list[str]:
    # "nonfinite/tdm" -> "tdm", "fake/nonfinite/tdm_fake" -> "fake/tdm_fake",
    # a term's own flag "tdm/nonfinite/targets" -> "tdm/targets"
    return [k.replace("nonfinite/", "", 1) for k, v in metrics.items() if "nonfinite/" in k and v]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    student_factory: StudentFactory,
    teacher: Any,
    data_source: BatchSource,
    eval_fn: EvalFn | None = None,
    report_fn: ReportFn | None = None,
    init_params: Any = None,
) -> TrainState:
    """Trains ``config.train.num_steps`` steps (resuming from ``workdir/checkpoints``).

    student_factory: config -> (main Net, {aux name: Net}). teacher: a Teacher pytree (or None),
    passed to the step as an argument. data_source: this process's rows of global batch
    ``step``. eval_fn: (state, step) -> scalars, run every ``train.eval_every`` steps and at
    the end. report_fn: (workdir, final scalars) -> None, run once on the main process when the
    last step is done (not on preemption). init_params: params of the main network instead of
    ``Net.init`` (e.g. a student initialised from its teacher). Raises NonFiniteError when a
    loss/gradient goes non-finite (unless ``train.skip_nonfinite``); the bad state is never saved.
    """
    parallel.initialize_distributed()
    workdir_p = FilePath(workdir)
    is_main = jax.process_index() == 0
    tc = config.train
    num_steps = int(tc.num_steps)
    mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    main_net, aux_nets = student_factory(config)

    def create():
        return create_state(
            config, main_net.init, {n: a.init for n, a in aux_nets.items()}, params=init_params
        )

    abstract = jax.eval_shape(create)
    shardings = state_shardings(abstract, mesh, int(config.mesh.min_shard_size))
    ckpt = checkpoints.Checkpointer(
        workdir_p / "checkpoints",
        int(tc.checkpoint_every),
        int(tc.keep_checkpoints),
        bool(tc.async_checkpoints),
    )
    checkpoints.install_preemption_handler()
    restored = ckpt.restore_latest(_with_sharding(abstract, shardings))
    if restored is None:
        state, start = jax.jit(create, out_shardings=shardings)(), 0
        logging.info("fresh run in %s", workdir)
    else:
        state, meta, start = restored
        logging.info("resumed from step %d (%s)", start, meta)
    if is_main:
        print(f"{'resumed at' if start else 'starting at'} step {start} of {num_steps}", flush=True)
    writers.log_parameter_overview(state.params)
    if teacher is not None:
        teacher = parallel.shard_tree(teacher, parallel.replicated(mesh))
    step_fn = make_train_step(
        config,
        main_net.student,
        {n: a.student for n, a in aux_nets.items()},
        mesh=mesh,
        state_sharding=shardings,
    )
    writer = writers.make_writer(workdir_p, is_main=is_main)
    progress = writers.ProgressReporter(num_steps, writer, every_steps=int(tc.log_every), is_main=is_main)
    eval_every = int(tc.eval_every)
    evals: dict[str, float] = {}
    try:
        for i in range(start, num_steps):
            batch = parallel.global_batch(data_source.batch(i), mesh)
            state, metrics = step_fn(state, teacher, batch)
            done = i + 1
            if not tc.skip_nonfinite:
                flags = jax.device_get({k: v for k, v in metrics.items() if "nonfinite/" in k})
                bad = _bad_terms(flags)
                if bad:
                    ckpt.wait()
                    last = ckpt.all_steps()
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {i} (0-based; batch {i}) in loss term(s) "
                        f"{bad}; not saved. Last good checkpoint: "
                        f"{(workdir_p / 'checkpoints' / str(last[-1])) if last else 'none'}"
                        + (
                            ". '<term>/normalizer': the term's per-sample normaliser mean_D|x - x0_real| "
                            "collapsed or exploded (metrics <term>/grad_scale_max, <term>/normalizer_max; "
                            "config max_grad_scale, max_normalizer)"
                            if any(b.endswith("/normalizer") for b in bad)
                            else ""
                        )
                    )
            ckpt.save(done, state, {"next_step": done})
            if done % int(tc.log_every) == 0 or done == num_steps:
                writer.write_scalars(done, jax.device_get(metrics))
            progress(done, metrics)
            if eval_fn is not None and eval_every > 0 and done % eval_every == 0 and done != num_steps:
                with progress.timed("eval"):
                    write_eval(writer, done, eval_fn(state, done))
            if ckpt.reached_preemption(done):
                ckpt.save(done, state, {"next_step": done}, force=True)
                ckpt.wait()
                logging.warning("preempted: saved step %d, exiting", done)
                if is_main:
                    print(f"preempted at step {done}", flush=True)
                return state
        ckpt.save(num_steps, state, {"next_step": num_steps}, force=True)
        ckpt.wait()
        if eval_fn is not None:
            evals = write_eval(writer, num_steps, eval_fn(state, num_steps))
    finally:
        ckpt.close()
        writer.flush()
        writer.close()
    if is_main and report_fn is not None:
        report_fn(workdir_p, evals)
    return state


def write_eval(writer, step: int, out: dict) -> dict[str, float]:
    """Writes an evaluation: scalars as ``eval/<name>``, NHWC sample batches (keys ``images/<name>``)
    as TensorBoard image grids ``samples/<name>``; returns the scalars."""
    images = {k[len("images/") :]: v for k, v in out.items() if k.startswith("images/")}
    scalars = {k: v for k, v in out.items() if not k.startswith("images/")}
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    if images:
        writers.write_images(writer, step, {f"samples/{k}": np.asarray(v) for k, v in images.items()})
    return scalars


__all__ = [
    "EvalFn",
    "Net",
    "NonFiniteError",
    "ReportFn",
    "host_tree",
    "train",
    "write_eval",
]
