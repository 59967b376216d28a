"""Real image datasets through tensorflow-datasets, loaded whole into host RAM.

Choice: every process loads the *full* split and feeds `ArraySource`, which gathers only the
process's rows of each global batch. We deliberately do not use `tfds.split_for_jax_process` /
`tfds.even_splits`: per-process shards would make the global batch of a step depend on the
process count and break resume-anywhere determinism. Limit: the split must fit in every host's
RAM as float32 (MNIST 60k: 188 MB; CIFAR-10 50k: 614 MB). Datasets much larger than that need a
random-access reader (`tfds.data_source` over ArrayRecord) indexed by `ArraySource.indices`.

Both on-disk formats are read: TFRecord (the TFDS default, via `as_dataset(batch_size=-1)`) and
ArrayRecord (via `as_data_source`, TensorFlow-free). Nothing is downloaded unless asked.
"""

from __future__ import annotations

import os

import numpy as np

from fewstep_jax.data.builtin import Arrays, uint8_to_unit


def _read_split(builder, split: str) -> dict[str, np.ndarray]:
    """The whole split as numpy arrays with a leading example dimension."""
    import tensorflow_datasets as tfds

    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = builder.as_data_source(split=split)
        records = source.__getitems__(list(range(len(source))))
        if not records:
            raise ValueError(f"TFDS split {split!r} of {builder.name} is empty")
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))


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
    import tensorflow_datasets as tfds

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
    raw = _read_split(builder, split)
    images = raw[image_key]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"TFDS {name!r}[{image_key!r}] must be uint8 (N, H, W, C), got {images.dtype} {images.shape}"
        )
    out = {"x": uint8_to_unit(images)}
    if label_key in raw:
        out["label"] = np.asarray(raw[label_key]).astype(np.int32)
    return out
