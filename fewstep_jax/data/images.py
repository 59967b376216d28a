"""Image arrays: raw uint8 pixels -> the float32 {"x", "label"} arrays every loader returns.

The bottom of the data package (numpy only): the loaders (`builtin`, `tfds_source`) and the
random-access reader (`random_access`) all import from here, never from one another's callers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]


def uint8_to_unit(images: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """Pixel values in [0, max_value] -> float32 in [-1, 1], NHWC (adds C=1 to (N, H, W))."""
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W) or (N, H, W, C), got shape {images.shape}")
    return x * np.float32(2.0 / max_value) - np.float32(1.0)


def image_arrays(raw: Mapping[str, np.ndarray], image_key: str, label_key: str | None, what: str) -> Arrays:
    """Raw stacked features -> {"x": float32 (N, H, W, C) in [-1, 1], "label": int32 (N,)}.

    `raw[image_key]` must be uint8 (N, H, W, C) or (N, H, W) (grey: gets C = 1); "label" is present
    iff `label_key` is given and in `raw`. `what` names the data in errors.
    """
    images = np.asarray(raw[image_key])
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{what}[{image_key!r}] must be uint8 (N, H, W, C) or (N, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    out = {"x": uint8_to_unit(images)}
    if label_key is not None and label_key in raw:
        out["label"] = np.asarray(raw[label_key]).astype(np.int32)
    return out
