"""Real image datasets through tensorflow-datasets: whole splits in host RAM, or read by index.

Choice: every process sees the *full* split, and the batch sources (`ArraySource` in memory,
`RandomAccessSource` by index) give each process its rows of each global batch. We deliberately do
not use `tfds.split_for_jax_process` / `tfds.even_splits`: per-process shards would make the global
batch of a step depend on the process count and break resume-anywhere determinism.

Both on-disk formats are read. `load_tfds_arrays` loads a whole split as float32 (MNIST 60k: 188
MB; CIFAR-10 50k: 614 MB; ImageNet-64 1.28M: 63 GB, too much): TFRecord (the TFDS default) via
`as_dataset(batch_size=-1)`, ArrayRecord via `as_data_source`. `tfds_data_source` opens an
ArrayRecord split for random access (TFRecord has none) without reading it, and `tfds_image_info`
gives shape, classes, size and format from the builder's metadata alone. Nothing is downloaded
unless asked. TensorFlow and tensorflow-datasets are the optional extra `fewstep-jax[tfds]`, imported
on first use (`import_tfds`): without them every other loader works and these raise one line saying
what to install.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from fewstep_jax.data.images import Arrays, image_arrays
from fewstep_jax.data.random_access import read_records, stack_records
from fewstep_jax.errors import MissingPackageError

ARRAY_RECORD = "array_record"
TFDS_INSTALL_HINT = (
    'reading TFDS datasets needs TensorFlow and tensorflow-datasets: pip install "fewstep-jax[tfds]"'
)


def import_tfds():
    """The `tensorflow_datasets` module, imported on first use: only TFDS reading needs TensorFlow
    (an optional extra), so a machine without it runs everything else."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise MissingPackageError(TFDS_INSTALL_HINT) from e
    return tfds


class TfdsImageInfo(NamedTuple):
    """What the builder's metadata says of an image split (no example is read).

    num_classes is the ClassLabel's count (0 without a label feature, None when the label is not a
    ClassLabel); file_format is "array_record" (random access) or "tfrecord" (sequential only).
    """

    name: str
    split: str
    num_examples: int
    data_shape: tuple[int, int, int]
    num_classes: int | None
    file_format: str

    @property
    def float32_bytes(self) -> int:
        """Bytes of the whole split's images as float32 (what loading it in memory costs)."""
        return self.num_examples * int(np.prod(self.data_shape)) * 4

    @property
    def random_access(self) -> bool:
        return self.file_format == ARRAY_RECORD


def _prepared_builder(name: str, data_dir: str | os.PathLike | None, download: bool, image_key: str):
    """The TFDS builder of a prepared dataset, with clear errors when it is not there."""
    tfds = import_tfds()

    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is neither a registered TFDS dataset nor prepared in {where}"
        ) from e
    if download:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
            f"`tfds.builder({name!r}, data_dir=...).download_and_prepare()` on a machine with "
            "network access, or pass download=True."
        )
    features = builder.info.features
    if image_key not in features:
        raise ValueError(
            f"TFDS dataset {name!r} has no image feature {image_key!r}; features: {list(features)}"
        )
    return builder


def _is_array_record(builder) -> bool:
    tfds = import_tfds()

    return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def _read_split(builder, split: str) -> dict[str, np.ndarray]:
    """The whole split as numpy arrays with a leading example dimension."""
    tfds = import_tfds()

    if _is_array_record(builder):
        source = builder.as_data_source(split=split)
        records = read_records(source, range(len(source)))
        if not records:
            raise ValueError(f"TFDS split {split!r} of {builder.name} is empty")
        return stack_records(records, list(records[0]))
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))


def tfds_image_info(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> TfdsImageInfo:
    """Shape (H, W, C), class count, size and on-disk format of a prepared TFDS image split,
    from its metadata only (fast whatever the split's size)."""
    tfds = import_tfds()

    builder = _prepared_builder(name, data_dir, download, image_key)
    features = builder.info.features
    shape = tuple(features[image_key].shape)
    if len(shape) != 3 or any(d is None for d in shape):
        raise ValueError(
            f"TFDS dataset {name!r}: image feature {image_key!r} has shape {shape}; batches need a "
            "fixed (H, W, C) (use a resized variant, e.g. imagenet_resized/64x64)"
        )
    num_classes: int | None = 0
    if label_key in features:
        label = features[label_key]
        num_classes = int(label.num_classes) if isinstance(label, tfds.features.ClassLabel) else None
    fmt = ARRAY_RECORD if _is_array_record(builder) else "tfrecord"
    n = int(builder.info.splits[split].num_examples)
    return TfdsImageInfo(name, split, n, (int(shape[0]), int(shape[1]), int(shape[2])), num_classes, fmt)


def tfds_data_source(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_key: str = "image",
) -> Any:
    """A random-access view of a prepared ArrayRecord split (`len`, `[i]`, `__getitems__` of
    decoded record dicts of numpy arrays); nothing is read until indexed. For `RandomAccessSource`.
    """
    builder = _prepared_builder(name, data_dir, download, image_key)
    if not _is_array_record(builder):
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
            "which has no random access; prepare it with "
            "download_and_prepare(file_format='array_record') or load it in memory"
        )
    return builder.as_data_source(split=split)


def load_tfds_arrays(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> Arrays:
    """Load a TFDS image split: {"x": float32 (N, H, W, C) in [-1, 1], "label": int32 (N,)}.

    `name` is a registered TFDS name (e.g. "mnist", "cifar10", "mnist:3.0.1") or any dataset
    prepared in `data_dir`. Example order is TFDS's deterministic on-disk order (shuffling is
    `ArraySource`'s job). "label" is omitted when the dataset has no `label_key` feature.
    `download=True` calls `download_and_prepare()` (needs network unless already prepared).
    """
    builder = _prepared_builder(name, data_dir, download, image_key)
    return image_arrays(_read_split(builder, split), image_key, label_key, f"TFDS {name!r}")
