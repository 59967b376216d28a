"""Image datasets read by index, one batch at a time, never held whole in memory.

`RandomAccessSource` draws exactly the examples `ArraySource` would for the same (seed, step,
process) (both are `IndexedSource`s: one index computation) but reads only this process's rows
from a random-access container: anything with `__len__` and `__getitem__(int)`, and optionally
`__getitems__(list[int])` for batched reads, whose items are dicts of numpy arrays (an image uint8
(H, W, C) or (H, W) and, optionally, an integer label). TFDS's `builder.as_data_source(split)` of
an ArrayRecord dataset is such a container (`fewstep_jax.data.tfds_source.tfds_data_source`), so a
1.28M-image ImageNet-64 costs each host one batch of decoded images instead of 63 GB of float32.
With a `convert` function the records may hold any keys: the prompt / latent caches
(data/latent_cache.py) are served this way, by the same index computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fewstep_jax.data.images import image_arrays
from fewstep_jax.data.sources import ArraySpec, Batch, IndexedSource


class RandomAccess(Protocol):
    """A random-access dataset: `len(c)` examples, `c[i]` one record (a dict of arrays)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: int) -> Mapping[str, Any]: ...


def read_records(container: RandomAccess, keys: Sequence[int]) -> list[Mapping[str, Any]]:
    """Records `keys` of a container, in that order; one batched `__getitems__` call when it has one."""
    keys = [int(k) for k in keys]
    getitems = getattr(container, "__getitems__", None)
    records = list(getitems(keys)) if getitems is not None else [container[k] for k in keys]
    if len(records) != len(keys):
        raise IndexError(f"asked for {len(keys)} records, got {len(records)}")
    return records


def stack_records(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """`{key: stacked values}` of a list of record dicts (each must have every key)."""
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


class RandomAccessSource(IndexedSource):
    """Batches read by index from a random-access image container (same batches as `ArraySource`).

    `batch(step)` reads the L = G / process_count records of this process's rows of global batch
    `step` (each distinct index once, in ascending order, which is what ArrayRecord reads fastest)
    and returns {"x": float32 (L, H, W, C) in [-1, 1][, "label": int32 (L,)]}: the batch
    `ArraySource(image_arrays(all records))` gives for the same seed, step and process.

    Args:
      container: `__len__` + `__getitem__` (+ optional `__getitems__`), records are dicts holding
        `image_key` (uint8 (H, W, C)) and, when `label_key` is not None, `label_key`.
      global_batch_size: G, divisible by `process_count`.
      label_key: None for images only (an unconditional model).
      data_shape: (H, W, C) of the images, when known (e.g. from TFDS's features); otherwise one
        record is read the first time `element_spec` is asked for.
      convert: records of any keys -> the batch (a dict of arrays or of dicts of arrays, e.g.
        data/latent_cache.py's {"label": condition dict, "x": latents}), in place of the image
        conversion (image_key, label_key and data_shape are then unused).
    """

    def __init__(
        self,
        container: RandomAccess,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        shuffle: bool = True,
        image_key: str = "image",
        label_key: str | None = "label",
        data_shape: tuple[int, ...] | None = None,
        name: str = "random-access dataset",
        convert: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
    ) -> None:
        if not hasattr(container, "__len__") or not hasattr(container, "__getitem__"):
            raise TypeError(
                f"{name}: a random-access container needs __len__ and __getitem__, got {type(container)}"
            )
        n = len(container)
        super().__init__(n, global_batch_size, seed, process_index, process_count, shuffle=shuffle)
        self.container = container
        self.image_key = image_key
        self.label_key = label_key
        self.name = name
        self._data_shape = None if data_shape is None else tuple(int(d) for d in data_shape)
        self._custom = convert
        self._spec: dict[str, Any] | None = None

    def _convert(self, records: Sequence[Mapping[str, Any]]) -> Batch:
        if self._custom is not None:
            return dict(self._custom(records))
        keys = [self.image_key] if self.label_key is None else [self.image_key, self.label_key]
        missing = [k for k in keys if k not in records[0]]
        if missing:
            raise ValueError(f"{self.name}: records lack key(s) {missing}; they have {sorted(records[0])}")
        return image_arrays(stack_records(records, keys), self.image_key, self.label_key, self.name)

    @property
    def element_spec(self) -> dict[str, ArraySpec]:
        if self._custom is not None:  # nested dicts of specs for nested batches
            if self._spec is None:
                self._spec = _map(
                    lambda v: ArraySpec(v.shape[1:], v.dtype),
                    self._convert(read_records(self.container, [0])),
                )
            return dict(self._spec)
        if self._data_shape is None:
            self._data_shape = tuple(self._convert(read_records(self.container, [0]))["x"].shape[1:])
        spec = {"x": ArraySpec(self._data_shape, np.dtype(np.float32))}
        if self.label_key is not None:
            spec["label"] = ArraySpec((), np.dtype(np.int32))
        return spec

    def _read(self, idx: np.ndarray) -> Batch:
        # A batch straddling an epoch boundary may hold an index twice: read it once.
        unique, inverse = np.unique(idx, return_inverse=True)
        batch = self._convert(read_records(self.container, unique.tolist()))
        return _map(lambda v: v[inverse], batch)


def _map(fn: Callable[[np.ndarray], Any], batch: Mapping[str, Any]) -> dict[str, Any]:
    """fn on every array of a dict of arrays and of dicts of arrays."""
    return {k: _map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in batch.items()}
