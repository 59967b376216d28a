"""Evaluation of a teacher while it trains (passed to the loop as its ``eval_fn``).

On an exact testbed the trained teacher's solvers are scored next to the analytic teacher's at the
same NFE and noise; on a dataset testbed, its samples (and FID when configured)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.testbeds.base import Testbed
from fewstep_jax.train.loop import EvalFn, host_tree
from fewstep_jax.train.state import TrainState


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


def dataset_eval_fn(config: ml_collections.ConfigDict, testbed: Testbed) -> EvalFn:
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


def teacher_eval_fn(config: ml_collections.ConfigDict, testbed: Testbed) -> EvalFn:
    """Sample distances of the trained teacher (eval EMA) at a few NFEs of a few solvers, next
    to the analytic teacher's at the same NFE and noise (keys ``<solver>_nfe<n>/<dist>`` and
    ``analytic/<solver>_nfe<n>/<dist>``), and the flow-map MSE between the two. A dataset
    testbed has no analytic teacher: :func:`dataset_eval_fn`."""
    from fewstep_jax.evaluation.teacher_solvers import solve_batched
    from fewstep_jax.metrics import sample_distances

    analytic = testbed.exact_teacher
    if analytic is None:
        return dataset_eval_fn(config, testbed)
    ec = config.eval
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
            out[f"{method}_nfe{nfe}/mse_vs_analytic"] = sample_distances.flow_map_error(
                x0, ref_samples[f"{method}_nfe{nfe}"]
            )
            if testbed.is_image:  # a few samples to TensorBoard (written by write_eval)
                out[f"images/{method}_nfe{nfe}"] = x0[:16]
        return out

    return evaluate


__all__ = ["dataset_eval_fn", "teacher_eval_fn"]
