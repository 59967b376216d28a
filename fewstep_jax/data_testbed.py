"""Dataset testbeds: a real image dataset (TFDS) to train and distill on, without an exact teacher.

An exact testbed (:mod:`fewstep_jax.testbeds`) has an analytic teacher and a reference flow map;
a dataset such as CIFAR-10 has neither, so a :class:`DatasetTestbed` (``teacher`` is None) gives
only what a real dataset can: its training batches and a sample distance, the FID against
reference statistics when ``config.eval.fid_inception`` and ``config.eval.fid_reference`` are set
(none otherwise: the evaluation then draws samples only). Named ``tfds:<name>`` in
``config.testbed.name`` (e.g. ``tfds:cifar10``, ``tfds:imagenet_resized/64x64``), read from
``config.testbed.data_dir`` ("" = TFDS's default data_dir), split ``config.testbed.split``.

The dataset is loaded lazily, on the first access to its arrays, so a data-free distillation
(``student.data = "noise"``) or a dry run never needs it on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import ml_collections
import numpy as np

from fewstep_jax.data import ArraySource, load_dataset
from fewstep_jax.evaluation.fid import FIDScorer
from fewstep_jax.paths import Path, get_path

PREFIX = "tfds:"
FID_OFF_HELP = (
    "FID is off for testbed {name!r}: evaluations draw samples only. Turn it on with "
    "config.eval.fid_inception (converted Inception weights, `python -m "
    "fewstep_jax.evaluation.inception --convert ...`) and config.eval.fid_reference (.npz of mu, "
    "sigma: `python -m fewstep_jax.evaluation.fid stats ...`)."
)


def is_dataset_name(name: str) -> bool:
    """Whether a testbed name names a dataset testbed (``tfds:<name>``)."""
    return name.startswith(PREFIX)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetTestbed:
    """A TFDS image dataset: batches to train on and (optionally) FID; no analytic teacher.

    Attributes:
      name: ``tfds:<name>`` as in the config.
      path: the probability path runs on it use (the teacher's).
      data_dir: TFDS data_dir, None for TFDS's default.
      split: the split batches are drawn from.
      fid: the FID scorer, or None (no distance).
    """

    name: str
    path: Path
    data_dir: str | None = None
    split: str = "train"
    fid: FIDScorer | None = None

    teacher = None  # no exact flow map: nothing is scored against an analytic teacher
    is_image = True

    @property
    def singular_at_data(self) -> bool:
        """Whether the path's velocity is singular at t = 0 (VP paths): solvers end with Euler."""
        return self.path.deriv_floor > 0

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split, ``{"x": (N, H, W, C) float32 in [-1, 1], "label": (N,) int32}``."""
        try:
            return load_dataset(self.name, split=self.split, data_dir=self.data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"testbed.name={self.name!r} (testbed.data_dir={self.data_dir or ''!r}, "
                f"testbed.split={self.split!r}): {e}"
            ) from e

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.arrays["x"].shape[1:])

    @property
    def num_classes(self) -> int:
        """1 + the largest label (0 when the dataset has no labels)."""
        return int(self.arrays["label"].max()) + 1 if "label" in self.arrays else 0

    def source(
        self, conditional: bool, batch_size: int, seed: int, process_index: int, process_count: int
    ) -> ArraySource:
        """This process's rows of the global batches; labels only for a ``conditional`` model."""
        if conditional and "label" not in self.arrays:
            raise ValueError(f"the model is class-conditional but dataset {self.name!r} has no labels")
        keys = ("x", "label") if conditional else ("x",)
        return ArraySource({k: self.arrays[k] for k in keys}, batch_size, seed, process_index, process_count)

    def check_model(self, model_cfg: ml_collections.ConfigDict) -> None:
        """A clear error when a network config does not fit the dataset's images or labels."""
        if model_cfg.get("name") != "unet":
            raise ValueError(
                f"dataset testbed {self.name!r} needs an image model (unet), got {model_cfg.get('name')!r}"
            )
        want = (int(model_cfg.sample_size), int(model_cfg.sample_size), int(model_cfg.in_channels))
        if want != self.data_shape:
            raise ValueError(
                f"config.model (sample_size, in_channels) gives images {want}, but dataset "
                f"{self.name!r} has {self.data_shape}"
            )
        nc = int(model_cfg.get("num_classes", 0))
        if nc and self.num_classes > nc:
            raise ValueError(
                f"dataset {self.name!r} has labels up to {self.num_classes - 1}; model.num_classes={nc}"
            )

    @property
    def distance_names(self) -> tuple[str, ...]:
        return ("fid",) if self.fid is not None else ()

    @property
    def main_distance(self) -> str | None:
        return "fid" if self.fid is not None else None

    def distances(self, x: np.ndarray) -> dict[str, float]:
        """``{"fid": ...}`` of samples (N, H, W, C) in [-1, 1] (NaN if not finite); {} if FID is off."""
        return {"fid": self.fid(x)} if self.fid is not None else {}


def make_dataset_testbed(config: ml_collections.ConfigDict) -> DatasetTestbed:
    """The dataset testbed of ``config.testbed`` with the FID of ``config.eval`` (or none, logged)."""
    tb, ec = config.testbed, config.eval
    if not is_dataset_name(tb.name) or not tb.name[len(PREFIX) :]:
        raise ValueError(
            f"testbed.name={tb.name!r} is not a dataset name; expected 'tfds:<name>', e.g. 'tfds:cifar10'"
        )
    inception, reference = str(ec.get("fid_inception", "")), str(ec.get("fid_reference", ""))
    if bool(inception) != bool(reference):
        missing = "config.eval.fid_reference" if inception else "config.eval.fid_inception"
        raise ValueError(
            f"FID needs both config.eval.fid_inception and config.eval.fid_reference; {missing} is empty"
        )
    fid = None
    if inception:
        fid = FIDScorer.from_files(
            inception, reference, int(ec.get("fid_batch_size", 256)), int(ec.get("fid_resize_to", 299))
        )
        logging.info("FID on for %s: weights %s, reference %s", tb.name, inception, reference)
    else:
        logging.warning(FID_OFF_HELP.format(name=tb.name))
    data_dir = str(tb.get("data_dir", "")) or None
    return DatasetTestbed(tb.name, get_path(tb.path), data_dir, str(tb.get("split", "train")), fid)


__all__ = ["PREFIX", "DatasetTestbed", "is_dataset_name", "make_dataset_testbed"]
