"""Dataset loaders returning in-memory numpy arrays ready for `ArraySource`.

All loaders return {"x": float32 (N, H, W, C) in [-1, 1], "label": int32 (N,)}. The top of the
data package: `load_dataset` dispatches to the TFDS loader, which imports nothing from here.
"""

from __future__ import annotations

import os

import numpy as np

from fewstep_jax.data.images import Arrays, uint8_to_unit
from fewstep_jax.data.tfds_source import load_tfds_arrays

KNOWN_DATASETS = ("digits", "mnist", "tfds:<name>")

_MNIST_HELP = (
    "Get MNIST either as an .npz with keys x_train/y_train/x_test/y_test (uint8 images "
    "(N, 28, 28)) and pass its path, or through tensorflow-datasets: run "
    "`tfds.builder('mnist', data_dir=DIR).download_and_prepare()` once on a machine with "
    "network access and load with path=None, data_dir=DIR."
)


def load_digits() -> Arrays:
    """scikit-learn's bundled 8x8 digits (offline): x (1797, 8, 8, 1), label (1797,) in 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    # Pixel values are integers 0..16.
    x = uint8_to_unit(d.images, max_value=16.0)
    return {"x": x, "label": d.target.astype(np.int32)}


def load_mnist(path: str | os.PathLike, split: str = "train") -> Arrays:
    """MNIST from an .npz with keys x_{split} (N, 28, 28) uint8 and y_{split} (N,).

    Returns x (N, 28, 28, 1) float32 in [-1, 1] and label (N,) int32.
    """
    if split not in ("train", "test"):
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST file not found: {path}. {_MNIST_HELP}")
    xk, yk = f"x_{split}", f"y_{split}"
    with np.load(path) as f:
        missing = [k for k in (xk, yk) if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} lacks key(s) {missing} (has {sorted(f.files)}); expected "
                "x_train/y_train/x_test/y_test"
            )
        images, labels = f[xk], f[yk]
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{path}: {xk} must be (N, H, W) and {yk} (N,), got {images.shape} and {labels.shape}"
        )
    return {"x": uint8_to_unit(images), "label": labels.astype(np.int32)}


def load_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
) -> Arrays:
    """Load a dataset by name.

    name: "digits" (one split, "train" = all 1797 images), "mnist" (from `path`, or from
    tensorflow-datasets in `data_dir` when `path` is None), or "tfds:<name>" for any TFDS image
    dataset. `download=True` lets TFDS fetch and prepare data (needs network).
    """
    if name == "digits":
        if split != "train":
            raise ValueError(f"digits has a single split 'train', got {split!r}")
        return load_digits()
    if name == "mnist" and path is not None:
        return load_mnist(path, split)
    if name == "mnist" or name.startswith("tfds:"):
        tfds_name = name.removeprefix("tfds:")
        if not tfds_name:
            raise ValueError("empty TFDS dataset name in 'tfds:'; use e.g. 'tfds:cifar10'")
        try:
            return load_tfds_arrays(tfds_name, split, data_dir, download=download)
        except FileNotFoundError as e:
            if name == "mnist":
                raise FileNotFoundError(f"{e}\n{_MNIST_HELP}") from e
            raise
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
