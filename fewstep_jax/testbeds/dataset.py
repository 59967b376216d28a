"""Dataset testbeds: a real image dataset (TFDS) to train and distill on, without an exact teacher.

An exact testbed (:mod:`fewstep_jax.testbeds.exact`) has an analytic teacher and a reference flow map;
a dataset such as CIFAR-10 has neither, so a :class:`DatasetTestbed` (``exact_teacher`` is None) gives
only what a real dataset can: its training batches and a sample distance, the FID against
reference statistics when ``config.eval.fid_inception`` and ``config.eval.fid_reference`` are set
(none otherwise: the evaluation then draws samples only). Named ``tfds:<name>`` in
``config.testbed.name`` (e.g. ``tfds:cifar10``, ``tfds:imagenet_resized/64x64``), read from
``config.testbed.data_dir`` ("" = TFDS's default data_dir), split ``config.testbed.split``.

Where batches come from (``config.testbed.in_memory``): a split stored as ArrayRecord is read by
index, one batch at a time (:class:`~fewstep_jax.data.random_access.RandomAccessSource`), when
``in_memory`` is False or when the split would take more than :data:`IN_MEMORY_MAX_BYTES` of
float32 in every host's RAM; otherwise the whole split is loaded in memory (``ArraySource``: one
decode per image, fastest for CIFAR-size data). TFRecord has no random access, so a TFRecord split
is always loaded in memory, with a log line stating what that costs. Both give the same batches.
``data_shape`` and ``num_classes`` come from the dataset's TFDS metadata, not from its examples.

The dataset is opened lazily, on the first batch source or metadata query, so a data-free
distillation (``student.data = "noise"``) or a dry run never needs it on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import ml_collections
import numpy as np

from fewstep_jax.data import (
    ArraySource,
    BatchSource,
    RandomAccessSource,
    TfdsImageInfo,
    load_dataset,
    tfds_data_source,
    tfds_image_info,
)
from fewstep_jax.metrics.fid import FIDScorer
from fewstep_jax.paths import Path, get_path
from fewstep_jax.testbeds.base import Testbed

PREFIX = "tfds:"
# Larger float32 splits are read by index (when stored as ArrayRecord) even with in_memory=True:
# CIFAR-10 (614 MB) stays in memory, ImageNet-32/64 (15.7 / 63 GB) do not.
IN_MEMORY_MAX_BYTES = 4 * 2**30
FID_OFF_HELP = (
    "FID is off for testbed {name!r}: evaluations draw samples only. Turn it on with "
    "config.eval.fid_inception (converted Inception weights, `python -m "
    "fewstep_jax.metrics.inception --convert ...`) and config.eval.fid_reference (.npz of mu, "
    "sigma: `python -m fewstep_jax.metrics.fid stats ...`)."
)


def is_dataset_name(name: str) -> bool:
    """Whether a testbed name names a dataset testbed (``tfds:<name>``)."""
    return name.startswith(PREFIX)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetTestbed(Testbed):
    """A TFDS image dataset: batches to train on and (optionally) FID; no analytic teacher.

    Attributes:
      name: ``tfds:<name>`` as in the config.
      path: the probability path runs on it use (the teacher's).
      data_dir: TFDS data_dir, None for TFDS's default.
      split: the split batches are drawn from.
      fid: the FID scorer, or None (no distance).
      in_memory: False: read an ArrayRecord split by index whatever its size (see the module doc).
    """

    name: str
    path: Path
    data_dir: str | None = None
    split: str = "train"
    fid: FIDScorer | None = None
    in_memory: bool = True

    @property
    def exact_teacher(self) -> None:
        """None: no exact flow map, nothing is scored against an analytic teacher."""
        return None

    @property
    def is_image(self) -> bool:
        return True

    @property
    def singular_at_data(self) -> bool:
        """Whether the path's velocity is singular at t = 0 (VP paths): solvers end with Euler."""
        return self.path.deriv_floor > 0

    def _where(self) -> str:
        data_dir = self.data_dir or ""
        return f"testbed.name={self.name!r} (testbed.data_dir={data_dir!r}, testbed.split={self.split!r})"

    @functools.cached_property
    def info(self) -> TfdsImageInfo:
        """The split's shape, classes, size and format, from TFDS metadata (no example read)."""
        try:
            return tfds_image_info(self.name[len(PREFIX) :], self.split, self.data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self._where()}: {e}") from e

    @functools.cached_property
    def random_access(self) -> bool:
        """Whether batches are read by index (True) or gathered from the split in memory."""
        info = self.info
        if not info.random_access:
            if not self.in_memory:
                logging.warning(
                    "testbed.in_memory=False, but %s is stored as %s, which has no random access: "
                    "loading it in memory anyway (prepare it with file_format='array_record' to avoid this)",
                    self.name,
                    info.file_format,
                )
            return False
        return not self.in_memory or info.float32_bytes > IN_MEMORY_MAX_BYTES

    def _in_memory_reason(self) -> str:
        if not self.info.random_access:
            return f"{self.info.file_format} has no random access"
        if self.random_access:
            return "asked for the whole split although batches are read by index"
        return f"testbed.in_memory=True and under {IN_MEMORY_MAX_BYTES / 2**30:g} GiB"

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split, ``{"x": (N, H, W, C) float32 in [-1, 1], "label": (N,) int32}``."""
        info = self.info
        level = logging.WARNING if info.float32_bytes > IN_MEMORY_MAX_BYTES else logging.INFO
        logging.log(
            level,
            "%s split %r: loading all %d images %s into host RAM as float32: %.2f GB per host (%s)",
            self.name,
            self.split,
            info.num_examples,
            info.data_shape,
            info.float32_bytes / 1e9,
            self._in_memory_reason(),
        )
        try:
            return load_dataset(self.name, split=self.split, data_dir=self.data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self._where()}: {e}") from e

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.info.data_shape

    @property
    def num_classes(self) -> int:
        """The label feature's class count (0 when the dataset has no labels)."""
        nc = self.info.num_classes
        if nc is not None:
            return nc
        if self.random_access:  # counting the classes would read every example
            raise ValueError(
                f"{self._where()}: the label feature is not a tfds ClassLabel, so its class count is "
                "unknown without reading the whole split; set testbed.in_memory=True"
            )
        return int(self.arrays["label"].max()) + 1

    def source(
        self, conditional: bool, batch_size: int, seed: int, process_index: int, process_count: int
    ) -> BatchSource:
        """This process's rows of the global batches; labels only for a ``conditional`` model."""
        if conditional and self.info.num_classes == 0:
            raise ValueError(f"the model is class-conditional but dataset {self.name!r} has no labels")
        args = (batch_size, seed, process_index, process_count)
        if self.random_access:
            logging.info(
                "%s split %r: reading batches by index (%d ArrayRecord examples, nothing held in memory)",
                self.name,
                self.split,
                self.info.num_examples,
            )
            container = tfds_data_source(self.name[len(PREFIX) :], self.split, self.data_dir)
            label_key = "label" if conditional else None
            return RandomAccessSource(
                container, *args, label_key=label_key, data_shape=self.data_shape, name=self.name
            )
        keys = ("x", "label") if conditional else ("x",)
        return ArraySource({k: self.arrays[k] for k in keys}, *args)

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
            raise ValueError(f"dataset {self.name!r} has {self.num_classes} classes; model.num_classes={nc}")

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
    split, in_memory = str(tb.get("split", "train")), bool(tb.get("in_memory", True))
    return DatasetTestbed(tb.name, get_path(tb.path), data_dir, split, fid, in_memory)


__all__ = ["IN_MEMORY_MAX_BYTES", "PREFIX", "DatasetTestbed", "is_dataset_name", "make_dataset_testbed"]
