"""Tiny TFDS image datasets built locally (no download), for the data-pipeline tests."""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence

import numpy as np


def build_image_dataset(
    data_dir: str | os.PathLike,
    class_name: str,
    examples: Callable[[str], Sequence[tuple[np.ndarray, int]]],
    shape: tuple[int, int, int],
    num_classes: int,
    splits: Sequence[str] = ("train",),
    file_format: str = "tfrecord",
) -> None:
    """Prepares a dataset of uint8 ``shape`` images and ``num_classes`` labels in ``data_dir``.

    ``class_name`` (CamelCase) gives the TFDS name (``TinyCifar`` -> ``tiny_cifar``);
    ``examples(split)`` returns that split's (image, label) pairs. The builder is not registered:
    the code under test must find the dataset from ``data_dir`` alone, like a user's dataset.
    """
    import tensorflow_datasets as tfds

    def body(ns: dict) -> None:
        ns["VERSION"] = tfds.core.Version("1.0.0")
        ns["_info"] = lambda self: tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape),
                    "label": tfds.features.ClassLabel(num_classes=num_classes),
                }
            ),
        )
        ns["_split_generators"] = lambda self, dl_manager: {s: self._generate_examples(s) for s in splits}
        ns["_generate_examples"] = lambda self, split: (
            (i, {"image": image, "label": label}) for i, (image, label) in enumerate(examples(split))
        )

    cls = types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body)
    cls(data_dir=os.fspath(data_dir)).download_and_prepare(file_format=file_format)
