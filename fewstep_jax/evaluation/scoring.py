"""Scoring any few-step sampler against an exact testbed, in one row format.

A *sampler* is ``sampler(x1 (N, ...) noise at t = 1, nfe) -> samples (N, ...)`` or ``None`` when it
cannot run at that NFE. Teacher solvers, students and reflowed flows are all scored the same way:
on the same noise, against the same reference flow map ``Phi(x1, 1, 0)`` and the same data, giving
rows ``{testbed, method, nfe, flow_map_mse, <the testbed's distances>, ...}``.

A *conditional* reference (``make_reference(..., label=, guidance=)``) holds one class label per
noise and a CFG scale: its flow map is the guided teacher's with those labels, and every sample
distance becomes the per-class one (:func:`class_distances`), so conditional samplers must be
built with the same labels (``Reference.label``) in the same order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from fewstep_jax.metrics import sample_distances
from fewstep_jax.testbeds.exact import ExactTestbed, reference_flow_map

Sampler = Callable[[np.ndarray, int], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class Reference:
    """The shared evaluation noise and the exact flow map of it."""

    x1: np.ndarray  # (N, ...) noise at t = 1
    x0: np.ndarray  # (N, ...) Phi(x1, 1, 0)
    nfe: int  # NFE of the adaptive reference solve (the batch maximum)
    mse_vs_tighter: float  # its flow-map error against a 10x tighter tolerance (on <= 200 samples)
    seconds: float
    label: np.ndarray | None = None  # (N,) int32 class of each noise (conditional reference), or None
    guidance: float = 1.0  # Imagen CFG scale of the reference solve
    per_class: bool = True  # conditional reference: distances per class (False: pooled over classes)

    def distances(self, testbed: ExactTestbed, x: np.ndarray) -> dict[str, float]:
        """The testbed's distances of samples ``x`` (N, ...) made from ``x1``: per class (averaged
        over the classes) for a conditional reference with ``per_class``, else to the whole data
        distribution (pooled: the balanced labels make the samples a draw of the whole data)."""
        if self.label is None or not self.per_class:
            return testbed.distances(x)
        return class_distances(testbed, x, self.label)


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """(N,) int32 labels ``0, 1, ..., K-1, 0, 1, ...``: every class gets N // K or N // K + 1 noises."""
    if num_classes <= 0:
        raise ValueError(f"balanced labels need num_classes > 0, got {num_classes}")
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def make_reference(
    testbed: ExactTestbed,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 1000,
    label: np.ndarray | None = None,
    guidance: float = 1.0,
    rtol: float = 1e-5,
) -> Reference:
    """Draws the evaluation noise from ``seed`` and solves it exactly (adaptive RK45 at ``rtol`` =
    ``atol``; its error is measured against a 10x tighter solve of <= 200 samples).

    With ``label`` ((N,) int32) the reference is conditional: ``testbed.teacher`` guided at the
    Imagen scale ``guidance`` with those labels (rows are then scored per class)."""
    t0 = time.time()
    teacher = testbed.teacher
    if label is None and guidance != 1.0:
        raise ValueError(f"guidance={guidance} needs class labels (a conditional reference)")
    if label is not None:
        label = np.asarray(label, np.int32)
        if label.shape != (num_samples,):
            raise ValueError(f"label must have shape ({num_samples},), got {label.shape}")
        if teacher.num_classes <= 0:
            raise ValueError(f"teacher {teacher.name!r} of testbed {testbed.name!r} is unconditional")
    x1 = np.asarray(teacher.prior(jax.random.PRNGKey(seed), num_samples))
    x0, nfe = reference_flow_map(teacher, x1, label, guidance, rtol, rtol, batch_size=batch_size)
    n = min(200, num_samples)
    lab_n = None if label is None else label[:n]
    tight, _ = reference_flow_map(
        teacher, x1[:n], lab_n, guidance, rtol=rtol / 10, atol=rtol / 10, batch_size=batch_size
    )
    return Reference(
        x1, x0, nfe, sample_distances.flow_map_error(x0[:n], tight), time.time() - t0, label, float(guidance)
    )


def reference_rows(testbed: ExactTestbed, ref: Reference, seed: int = 0) -> list[dict]:
    """The converged teacher and (mixtures) a fresh data sample of the same size: the floor."""
    rows = [{"testbed": testbed.name, "method": "teacher (converged)", "nfe": ref.nfe, "flow_map_mse": 0.0}]
    rows[0].update(ref.distances(testbed, ref.x0))
    if not testbed.is_image:
        fresh = testbed.sample_data(np.random.default_rng(seed + 1), len(ref.x1))
        row = {"testbed": testbed.name, "method": "data (same size)", "nfe": 0, "flow_map_mse": float("nan")}
        if ref.label is None or not ref.per_class:
            row.update(testbed.distances(fresh["x"]))
        else:  # per class, with the data's own labels
            row.update(class_distances(testbed, fresh["x"], np.asarray(fresh["label"])))
        rows.append(row)
    return rows


def score(testbed: ExactTestbed, method: str, nfe: int, samples: np.ndarray, ref: Reference, **extra) -> dict:
    """One row: flow-map MSE against the reference and the testbed's sample distances."""
    row = {"testbed": testbed.name, "method": method, "nfe": nfe}
    finite = np.isfinite(samples).all()
    row["flow_map_mse"] = sample_distances.flow_map_error(samples, ref.x0) if finite else float("nan")
    row.update(ref.distances(testbed, samples))
    row.update(extra)
    return row


def class_distances(testbed: ExactTestbed, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Guided (conditional) samples ``x`` (N, ...) with their ``labels`` (N,): the testbed's
    distances of each class's samples to that class's reference data, averaged over the classes."""
    ref_lab = np.asarray(testbed.reference["label"])
    per = []
    for c in np.unique(labels):
        ref_c = {k: np.asarray(v)[ref_lab == c] for k, v in testbed.reference.items()}
        if not len(ref_c["label"]):
            raise ValueError(f"testbed {testbed.name!r} has no reference data of class {int(c)}")
        per.append(dataclasses.replace(testbed, reference=ref_c).distances(x[labels == c]))
    return {k: float(np.mean([d[k] for d in per])) for k in testbed.distance_names}


def evaluate_samplers(
    testbed: ExactTestbed,
    samplers: dict[str, Sampler],
    nfes,
    ref: Reference,
    log=print,
    keep: dict | None = None,
    keep_nfes=(1, 2, 4),
    **extra,
) -> list[dict]:
    """Rows for every (sampler, nfe) the sampler supports; samples at ``keep_nfes`` go to
    ``keep[name][nfe]`` when ``keep`` is given (for the report's figures)."""
    rows = []
    for name, sampler in samplers.items():
        for nfe in nfes:
            y = sampler(ref.x1, nfe)
            if y is None:
                continue
            row = score(testbed, name, nfe, np.asarray(y), ref, **extra)
            if keep is not None and nfe in keep_nfes:
                keep.setdefault(name, {})[nfe] = np.asarray(y)
            rows.append(row)
            log(
                f"[{testbed.name}] {name:12s} NFE {nfe:3d}: mse {row['flow_map_mse']:.3g} "
                + " ".join(f"{k} {row[k]:.3g}" for k in testbed.distance_names)
            )
    return rows


__all__ = [
    "Reference",
    "Sampler",
    "balanced_labels",
    "class_distances",
    "evaluate_samplers",
    "make_reference",
    "reference_rows",
    "score",
]
