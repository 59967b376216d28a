"""The training loop (side effects at the edges) and the training modes.

``train`` runs any method: distributed set-up, mesh, global batches (a pure function of (seed,
step), so resuming needs only the step), state init or automatic resume, SIGTERM preemption,
periodic async checkpoints, metric writers and progress, periodic evaluation, and at the end a
report (``loss_curve.png`` + ``report.md``) in the workdir. Modes (``main.MODES``):
``train_teacher(config, workdir)`` trains a teacher network on a testbed's data;
``distill(config, workdir)`` trains a student with the config's loss terms (generic).

Testbeds: an exact testbed (``gmm8``, ..., ``mnist``: analytic teacher, evaluations against its
exact flow map) or a real dataset ``tfds:<name>`` (:mod:`fewstep_jax.data_testbed`: no analytic
teacher, evaluations draw samples and give FID when ``eval.fid_inception`` / ``fid_reference``
are set; distilling needs a network teacher, ``teacher.workdir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import checkpoints, parallel, solvers
from fewstep_jax.data import ArraySource, BatchSource, SamplerSource, load_dataset
from fewstep_jax.models import build_model
from fewstep_jax.students import Student, model_apply
from fewstep_jax.train import writers
from fewstep_jax.train.state import TrainState, create_state
from fewstep_jax.train.step import make_train_step, state_shardings

EvalFn = Callable[[TrainState, int], dict[str, float]]


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
    init_params: Any = None,
) -> TrainState:
    """Trains ``config.train.num_steps`` steps (resuming from ``workdir/checkpoints``).

    student_factory: config -> (main Net, {aux name: Net}). teacher: a Teacher pytree (or None),
    passed to the step as an argument. data_source: this process's rows of global batch
    ``step``. eval_fn: (state, step) -> scalars, run every ``train.eval_every`` steps and at
    the end. init_params: params of the main network instead of ``Net.init`` (e.g. a student
    initialised from its teacher). Raises NonFiniteError when a loss/gradient goes non-finite
    (unless ``train.skip_nonfinite``); the bad state is never saved.
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
    if is_main:
        write_report(workdir_p, evals)
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


def write_report(workdir: FilePath, evals: dict[str, float]) -> None:
    """``loss_curve.png`` (loss terms vs step, from metrics.jsonl) and ``report.md`` (the last
    logged metrics and the final evaluation), drawn by :mod:`fewstep_jax.evaluation.report`."""
    from fewstep_jax.evaluation import report

    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/") or k.endswith("/loss")})
    figure = report.plot_loss_curves(rows, str(workdir / "loss_curve.png"), keys=keys)
    last = rows[-1] if rows else {}
    table = [{"metric": k, "value": v} for k, v in sorted(last.items()) if k != "step"]
    notes = f"Final step {last['step']}." if last else "No training step logged."
    if evals:
        table += [{"metric": f"eval/{k}", "value": v} for k, v in sorted(evals.items())]
    report.write_report(
        str(workdir), f"Run report: {workdir.name}", table, ["metric", "value"], {"Loss curve": figure}, notes
    )


# ---------------------------------------------------------------------------------------------
# train_teacher
# ---------------------------------------------------------------------------------------------


def make_testbed_from_config(config: ml_collections.ConfigDict):
    """The testbed of ``config.testbed``: an exact :class:`~fewstep_jax.testbeds.Testbed` or a
    :class:`~fewstep_jax.data_testbed.DatasetTestbed` for ``tfds:<name>``."""
    from fewstep_jax.data_testbed import is_dataset_name, make_dataset_testbed
    from fewstep_jax.testbeds import TESTBEDS, make_testbed

    tb = config.testbed
    if is_dataset_name(tb.name):
        return make_dataset_testbed(config)
    if tb.name not in TESTBEDS:
        raise ValueError(
            f"unknown testbed.name={tb.name!r}; expected an exact testbed {TESTBEDS} or a TFDS image "
            "dataset 'tfds:<name>' (e.g. 'tfds:cifar10', with testbed.data_dir and testbed.split)"
        )
    return make_testbed(
        tb.name,
        tb.path,
        num_reference=int(tb.num_reference),
        seed=int(config.seed),
        mnist_path=tb.mnist_path or None,
        subset=int(tb.subset),
    )


def teacher_data_source(config: ml_collections.ConfigDict, testbed) -> BatchSource:
    """This process's batches of the testbed's data; labels only for a conditional model."""
    conditional = int(config.model.get("num_classes", 0)) > 0
    keys = ("x", "label") if conditional else ("x",)
    args = (int(config.train.batch_size), int(config.seed), jax.process_index(), jax.process_count())
    if testbed.teacher is None:  # a real dataset
        return testbed.source(conditional, *args)
    if testbed.is_image:
        tb = config.testbed
        data = load_dataset(tb.name, path=(tb.mnist_path or None) if tb.name == "mnist" else None)
        return ArraySource({k: data[k] for k in keys}, *args)

    def sample(rng: np.random.Generator, n: int) -> dict:
        out = testbed.sample_data(rng, n)
        return {k: np.asarray(out[k], np.float32 if k == "x" else np.int32) for k in keys}

    return SamplerSource(sample, *args)


def teacher_network(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Net:
    """The teacher network to train: a model of ``config.model`` predicting
    ``config.teacher.prediction`` on the testbed's path."""
    from fewstep_jax.paths import get_path

    model = build_model(config.model)
    student = Student(
        model_apply(model),
        get_path(config.testbed.path),
        form="euler",
        prediction=config.teacher.prediction,
        uses_s=False,
    )

    def init(key):
        return model.init(key, jnp.zeros((1, *data_shape), jnp.float32), jnp.ones((1,), jnp.float32))[
            "params"
        ]

    return Net(student, init)


def _eval_cases(config: ml_collections.ConfigDict, path) -> list[tuple[str, int, np.ndarray]]:
    """(solver, nfe, grid) of the training-time evaluation: ``eval.train_solvers`` x ``train_nfes``."""
    from fewstep_jax.config_utils import as_tuple
    from fewstep_jax.solvers import default_grid

    ec = config.eval
    grid_kind = default_grid(path.name) if ec.grid == "auto" else ec.grid
    cases = []
    for method in as_tuple(ec.train_solvers):
        for nfe in as_tuple(ec.train_nfes, int):
            steps = nfe // solvers.nfe_of(method, 1)
            if steps >= 1 and solvers.nfe_of(method, steps) == nfe:
                cases.append((method, nfe, solvers.make_grid(grid_kind, steps, path)))
    return cases


def _trained_teacher(config: ml_collections.ConfigDict, state: TrainState, path, data_shape):
    """The network being trained by train_teacher (its eval EMA) as a Teacher."""
    from fewstep_jax.teachers.neural import neural_teacher

    params = jax.tree.map(jnp.asarray, host_tree(state.ema["eval"]))
    nc = int(config.model.get("num_classes", 0))
    pred = config.teacher.prediction
    return neural_teacher(config.model, params, path, pred, data_shape, nc, name="trained")


def dataset_eval_fn(config: ml_collections.ConfigDict, testbed) -> EvalFn:
    """Training-time evaluation on a dataset testbed (no analytic teacher): the trained teacher's
    samples at ``eval.train_nfes`` with ``eval.train_solvers`` from ``eval.train_num_samples``
    fixed noise (balanced labels for a class-conditional model, no guidance); the testbed's
    distances (``<solver>_nfe<n>/fid`` when FID is configured), the fraction of non-finite samples
    and the first 16 samples as TensorBoard image grids (``images/<solver>_nfe<n>``)."""
    from fewstep_jax.evaluation.scoring import balanced_labels
    from fewstep_jax.evaluation.teacher_solvers import solve_batched

    ec = config.eval
    shape = testbed.data_shape
    n, bs = int(ec.train_num_samples), int(ec.batch_size)
    cases = _eval_cases(config, testbed.path)
    key = jax.random.PRNGKey(int(config.seed) + 7)
    x1 = np.asarray(testbed.path.prior_scale * jax.random.normal(key, (n, *shape), jnp.float32))
    nc = int(config.model.get("num_classes", 0))
    label = balanced_labels(n, nc) if nc else None

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        teacher = _trained_teacher(config, state, testbed.path, shape)
        out = {}
        for method, nfe, grid in cases:
            x0 = solve_batched(teacher, x1, grid, method, bs, testbed.singular_at_data, label=label)
            for k, v in testbed.distances(x0).items():
                out[f"{method}_nfe{nfe}/{k}"] = v
            bad = ~np.isfinite(x0.reshape(len(x0), -1)).all(axis=1)
            out[f"{method}_nfe{nfe}/nonfinite_fraction"] = float(bad.mean())
            out[f"images/{method}_nfe{nfe}"] = x0[:16]
        return out

    return evaluate


def teacher_eval_fn(config: ml_collections.ConfigDict, testbed) -> EvalFn:
    """Sample distances of the trained teacher (eval EMA) at a few NFEs of a few solvers, next
    to the analytic teacher's at the same NFE and noise (keys ``<solver>_nfe<n>/<dist>`` and
    ``analytic/<solver>_nfe<n>/<dist>``), and the flow-map MSE between the two. A dataset
    testbed has no analytic teacher: :func:`dataset_eval_fn`."""
    from fewstep_jax.evaluation import metrics
    from fewstep_jax.evaluation.teacher_solvers import solve_batched

    if testbed.teacher is None:
        return dataset_eval_fn(config, testbed)
    ec = config.eval
    analytic = testbed.teacher
    n = int(ec.train_num_samples)
    x1 = np.asarray(analytic.prior(jax.random.PRNGKey(int(config.seed) + 7), n))
    cases = _eval_cases(config, analytic.path)
    bs = int(ec.batch_size)
    reference: dict[str, float] = {}
    ref_samples: dict[str, np.ndarray] = {}
    for method, nfe, grid in cases:
        x0 = solve_batched(analytic, x1, grid, method, bs)
        ref_samples[f"{method}_nfe{nfe}"] = x0
        for k, v in testbed.distances(x0).items():
            reference[f"analytic/{method}_nfe{nfe}/{k}"] = v

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        teacher = _trained_teacher(config, state, analytic.path, analytic.data_shape)
        out = dict(reference)
        for method, nfe, grid in cases:
            x0 = solve_batched(teacher, x1, grid, method, bs)
            for k, v in testbed.distances(x0).items():
                out[f"{method}_nfe{nfe}/{k}"] = v
            out[f"{method}_nfe{nfe}/mse_vs_analytic"] = metrics.flow_map_error(
                x0, ref_samples[f"{method}_nfe{nfe}"]
            )
            if testbed.is_image:  # a few samples to TensorBoard (written by write_eval)
                out[f"images/{method}_nfe{nfe}"] = x0[:16]
        return out

    return evaluate


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains a teacher network on the testbed's data with ``config.losses`` (flow_matching or
    diffusion); measures it against the analytic teacher at the end (``teacher_eval.json``)."""
    parallel.initialize_distributed()
    if not config.losses:
        raise ValueError("train_teacher needs config.losses (e.g. flow_matching or diffusion)")
    t0 = time.time()
    testbed = make_testbed_from_config(config)
    if testbed.teacher is None:  # a real dataset: the network must fit its images and labels
        testbed.check_model(config.model)
        data_shape = testbed.data_shape
    else:
        data_shape = testbed.teacher.data_shape
    net = teacher_network(config, data_shape)
    state = train(
        config,
        workdir,
        student_factory=lambda c: (net, {}),
        teacher=None,
        data_source=teacher_data_source(config, testbed),
        eval_fn=teacher_eval_fn(config, testbed),
    )
    if jax.process_index() == 0:
        evals = [r for r in writers.read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
        with open(FilePath(workdir) / "teacher_eval.json", "w") as f:
            json.dump({"wall_seconds": time.time() - t0, "eval": evals[-1] if evals else {}}, f, indent=1)
    return state


def _distill_nets(config: ml_collections.ConfigDict, teacher, data_shape) -> tuple[Net, dict[str, Net]]:
    from fewstep_jax.models import init_student_from_teacher

    def net(model_cfg, form, prediction, from_teacher) -> Net:
        model = build_model(model_cfg)
        student = Student(
            model_apply(model),
            teacher.path,
            form=form,
            prediction=prediction,
            uses_s=bool(model_cfg.get("use_s", False)),
        )

        def init(key):
            x, t = jnp.zeros((1, *data_shape), jnp.float32), jnp.ones((1,), jnp.float32)
            params = model.init(key, x, t)["params"]
            return init_student_from_teacher(params, teacher.params) if from_teacher else params

        return Net(student, init)

    # only a network teacher has params a student can copy (an analytic one holds data arrays)
    neural = bool(config.teacher.workdir)
    sc = config.student
    main = net(config.model, sc.form, sc.prediction, neural and sc.init_from_teacher)
    aux = {
        name: net(
            a.get("model", config.model),
            "euler",
            a.get("prediction", "flow"),
            neural and a.get("init_from_teacher", True),
        )
        for name, a in config.aux_nets.items()
    }
    return main, aux


@dataclasses.dataclass(frozen=True)
class Distilled:
    """What a distillation run produced: the final state, the student wrapper, the teacher."""

    state: TrainState
    student: Student
    teacher: Any
    testbed: Any
    train_seconds: float

    def params(self, ema: str = "eval") -> Any:
        """The student's params (an EMA copy by default) as host arrays."""
        return jax.tree.map(jnp.asarray, host_tree(self.state.ema[ema] if ema else self.state.params))


def teacher_pairs(config: ml_collections.ConfigDict, workdir: str, teacher) -> dict[str, np.ndarray]:
    """The teacher's (noise, sample) pairs of a ``student.data = "pairs"`` run (reflow): read from
    ``<workdir>/pairs.npz``, else generated once with ``config.student.pairs`` (num, solver, steps,
    batch_size; see :func:`fewstep_jax.reflow.generate_pairs`) and saved there, so a resumed run
    trains on the same pairs. Conditional teachers get uniform random labels."""
    from fewstep_jax import reflow

    f = FilePath(workdir) / "pairs.npz"
    if f.is_file():
        return reflow.load_pairs(f)
    pc = dict(config.student.get("pairs", None) or {})
    n = int(pc.get("num", 10_000))
    nc = int(config.model.get("num_classes", 0))
    labels = np.random.default_rng(int(config.seed)).integers(0, nc, n).astype(np.int32) if nc else None
    t0 = time.time()
    pairs = reflow.generate_pairs(
        teacher,
        jax.random.PRNGKey(int(config.seed) + 1),
        n,
        batch_size=int(pc.get("batch_size", 1000)),
        method=pc.get("solver", "heun"),
        num_steps=int(pc.get("steps", 32)),
        labels=labels,
    )
    if jax.process_index() == 0:  # every process generated the same pairs; one writes them
        tmp = FilePath(workdir) / "pairs.tmp.npz"
        reflow.save_pairs(tmp, pairs)
        tmp.replace(f)  # atomic: a preempted run never leaves a half-written pair file
        logging.info("generated %d teacher pairs in %.1f s -> %s", n, time.time() - t0, f)
    return pairs


def distill(config: ml_collections.ConfigDict, workdir: str, evaluate: bool = True) -> Distilled:
    """Generic distillation: the teacher from ``config.teacher.workdir`` (a train_teacher run)
    or the testbed's analytic teacher; the student (``config.model``, ``config.student``)
    initialised from a network teacher or fresh; loss terms from ``config.losses`` and aux
    networks from ``config.aux_nets``; batches of testbed data (``student.data = "data"``),
    noise only (``"noise"``) or the teacher's (noise, sample) pairs (``"pairs"``, see
    :func:`teacher_pairs`). Method-specific evaluation lands with the method issues."""
    from fewstep_jax.data import NoiseSource
    from fewstep_jax.teachers.neural import load_teacher_from_workdir

    parallel.initialize_distributed()
    if not config.losses:
        raise ValueError("distill needs config.losses (the method's loss terms)")
    testbed = make_testbed_from_config(config)
    wd = config.teacher.workdir
    if not wd and testbed.teacher is None:
        raise ValueError(
            f"testbed {testbed.name!r} is a real dataset with no analytic teacher: set "
            "config.teacher.workdir to a train_teacher run on it"
        )
    teacher = load_teacher_from_workdir(wd) if wd else testbed.teacher
    data_needed = testbed.teacher is None and config.student.data == "data"
    if data_needed and tuple(teacher.data_shape) != testbed.data_shape:
        raise ValueError(
            f"teacher {wd!r} makes images {teacher.data_shape}; dataset {testbed.name!r} has "
            f"{testbed.data_shape}"
        )
    if config.student.data == "noise":
        nc = int(config.model.get("num_classes", 0)) or None
        source = NoiseSource(
            teacher.data_shape,
            int(config.train.batch_size),
            int(config.seed),
            nc,
            jax.process_index(),
            jax.process_count(),
        )
    elif config.student.data == "data":
        source = teacher_data_source(config, testbed)
    elif config.student.data == "pairs":
        from fewstep_jax.reflow import pair_source

        pairs = teacher_pairs(config, workdir, teacher)
        source = pair_source(
            pairs, int(config.train.batch_size), int(config.seed), jax.process_index(), jax.process_count()
        )
    else:
        raise ValueError(f"student.data={config.student.data!r}; expected 'data', 'noise' or 'pairs'")
    main, aux = _distill_nets(config, teacher, teacher.data_shape)
    t0 = time.time()
    state = train(config, workdir, student_factory=lambda c: (main, aux), teacher=teacher, data_source=source)
    out = Distilled(state, main.student, teacher, testbed, time.time() - t0)
    # an exact testbed with its analytic teacher: score the student against Phi; a real dataset:
    # samples (and FID) of the student and of the network teacher's solvers
    if evaluate and jax.process_index() == 0 and (testbed.teacher is None or not wd):
        from fewstep_jax.evaluation.distill_eval import distill_report

        distill_report(
            config, workdir, main.student, out.params(), testbed, out.train_seconds, teacher=teacher
        )
    return out


__all__ = [
    "Distilled",
    "Net",
    "NonFiniteError",
    "dataset_eval_fn",
    "distill",
    "host_tree",
    "make_testbed_from_config",
    "teacher_data_source",
    "teacher_eval_fn",
    "teacher_network",
    "teacher_pairs",
    "train",
    "train_teacher",
    "write_eval",
    "write_report",
]
