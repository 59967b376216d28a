"""Teacher-generated (noise, sample) pairs for reflow and pair-based distillation (docs/methods.md §5.1).

A pair set is a dict of numpy arrays ``{"noise": (N, ...), "x": (N, ...)}`` (plus ``"label"``
(N,) int32 for conditional teachers), where ``x = Phi_teacher(noise, 1, 0)``: ``noise`` is at the
teacher's prior scale (``teacher.prior``), so losses divide by ``path.prior_scale`` to get eps.
Saved as one ``.npz``; :func:`pair_source` serves it as an :class:`ArraySource` with those keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.data import ArraySource
from fewstep_jax.teachers.base import Teacher

PAIR_KEYS = ("noise", "x")


def generate_pairs(
    teacher: Teacher,
    rng: jax.Array,
    num_pairs: int,
    batch_size: int = 1000,
    method: str = "heun",
    num_steps: int = 32,
    grid: str = "auto",
    labels: np.ndarray | None = None,
    guidance: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    euler_into_data: bool | None = None,
) -> dict[str, np.ndarray]:
    """Solves the teacher ODE from ``num_pairs`` prior samples to t = 0, in batches.

    Args:
      method: a fixed-step solver of :mod:`fewstep_jax.solvers` with ``num_steps`` steps on
        ``grid`` (``auto``: :func:`fewstep_jax.solvers.default_grid`), or ``"adaptive"``
        (Dormand-Prince with ``rtol``/``atol``, as the RF repo's RK45 pairs).
      labels: (num_pairs,) int class labels for a conditional teacher (saved as ``"label"``).
      euler_into_data: a fixed-step solve's last step into t = 0 is Euler (the solvers' rule,
        :func:`fewstep_jax.solvers.into_data_is_euler`); None: the teacher's own
        (:attr:`~fewstep_jax.teachers.base.Teacher.euler_into_data`, as the evaluation's solvers).
    Returns:
      ``{"noise", "x"[, "label"]}`` numpy arrays, float32 (N, *data_shape).
    """
    if num_pairs < 1 or batch_size < 1:
        raise ValueError(f"num_pairs and batch_size must be >= 1, got {num_pairs}, {batch_size}")
    if method != "adaptive" and method not in solvers.FIXED_STEP_SOLVERS:
        raise ValueError(
            f"unknown solver {method!r}; expected 'adaptive' or one of {solvers.FIXED_STEP_SOLVERS}"
        )
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num_pairs,):
            raise ValueError(f"labels must have shape ({num_pairs},), got {labels.shape}")
    if grid == "auto":
        grid = solvers.default_grid(teacher.path.name)
    times = None if method == "adaptive" else solvers.make_grid(grid, num_steps, teacher.path)
    into = teacher.euler_into_data_by(euler_into_data)

    @jax.jit
    def solve(teacher: Teacher, z, lab):
        if method == "adaptive":
            return solvers.solve_adaptive(teacher.velocity_fn(lab, guidance), z, 1.0, 0.0, rtol, atol)[0]
        return teacher.solve(z, times, method, lab, guidance, euler_into_data=into)

    noises, xs = [], []
    for i, start in enumerate(range(0, num_pairs, batch_size)):
        n = min(batch_size, num_pairs - start)
        z = teacher.prior(jax.random.fold_in(rng, i), n)
        lab = None if labels is None else jnp.asarray(labels[start : start + n])
        noises.append(np.asarray(z))
        xs.append(np.asarray(solve(teacher, z, lab)))
    pairs = {"noise": np.concatenate(noises), "x": np.concatenate(xs)}
    if labels is not None:
        pairs["label"] = labels
    return pairs


def check_pairs(pairs: Mapping[str, np.ndarray], where: str = "pairs") -> dict[str, np.ndarray]:
    """Validates keys and shapes of a pair set; returns it as a dict of numpy arrays."""
    missing = [k for k in PAIR_KEYS if k not in pairs]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; a pair set has {PAIR_KEYS} (+ optional 'label')")
    out = {k: np.asarray(v) for k, v in pairs.items()}
    if out["noise"].shape != out["x"].shape:
        raise ValueError(f"{where}: 'noise' {out['noise'].shape} and 'x' {out['x'].shape} differ in shape")
    if "label" in out and out["label"].shape != out["x"].shape[:1]:
        raise ValueError(f"{where}: 'label' {out['label'].shape} does not match {out['x'].shape[:1]} pairs")
    return out


def save_pairs(path: str | os.PathLike, pairs: Mapping[str, np.ndarray]) -> None:
    """Writes a pair set to ``path`` (.npz), creating its directory."""
    pairs = check_pairs(pairs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **pairs)


def load_pairs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a pair set written by :func:`save_pairs`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"pair file {os.fspath(path)!r} does not exist")
    with np.load(path) as f:
        return check_pairs({k: f[k] for k in f.files}, where=os.fspath(path))


def pair_source(
    pairs: str | os.PathLike | Mapping[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> ArraySource:
    """An :class:`ArraySource` over a pair set (or its .npz file): batches ``{"noise", "x"[, "label"]}``."""
    if not isinstance(pairs, Mapping):
        pairs = load_pairs(pairs)
    return ArraySource(check_pairs(pairs), global_batch_size, seed, process_index, process_count)


__all__ = ["PAIR_KEYS", "check_pairs", "generate_pairs", "load_pairs", "pair_source", "save_pairs"]
