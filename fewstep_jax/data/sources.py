"""Batch sources: stateless, per-step numpy batches for one process.

Every source maps `step -> batch` as a pure function of (seed, step, process_index,
process_count). The global batch of a step is the same examples in the same order whatever the
number of processes, and process `p` gets rows `[p * L, (p + 1) * L)` of it (`L` the local batch
size). Runs therefore resume at any step without iterator state, and a run on 1 host is
reproducible on 64. Turning local slices into global sharded `jax.Array`s is done elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]
SampleFn = Callable[[np.random.Generator, int], Mapping[str, np.ndarray]]


class ArraySpec(NamedTuple):
    """Shape (without the batch dimension) and dtype of one batch entry."""

    shape: tuple[int, ...]
    dtype: np.dtype


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop consumes: `batch(step)` is this process's slice of global batch
    `step`, a dict of arrays with leading dimension `local_batch_size`."""

    @property
    def element_spec(self) -> dict[str, ArraySpec]: ...

    @property
    def local_batch_size(self) -> int: ...

    def batch(self, step: int) -> Batch: ...


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Rows per process; validates the split of a global batch over processes."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}: every process must get the same number of rows"
        )
    return global_batch_size // process_count


def _check_step(step: int) -> None:
    # numpy seed sequences reject negative entries with an opaque message.
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def spec_of(batch: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Per-key spec of a batch (drops the leading batch dimension)."""
    return {k: ArraySpec(tuple(v.shape[1:]), v.dtype) for k, v in batch.items()}


class _Base:
    """Shared bookkeeping of the process split."""

    def __init__(self, global_batch_size: int, seed: int, process_index: int, process_count: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self._local = local_batch_size(global_batch_size, process_index, process_count)

    @property
    def local_batch_size(self) -> int:
        return self._local

    def _local_rows(self) -> slice:
        """This process's rows of a global batch."""
        start = self.process_index * self._local
        return slice(start, start + self._local)


class IndexedSource(_Base):
    """A dataset of N examples read by index, reshuffled every epoch, epochs laid end to end.

    Example `i` of the infinite stream is dataset index `perm(i // N)[i % N]` with `perm(e)` a
    permutation drawn by `np.random.default_rng([seed, e])`; global batch `s` is stream positions
    `[s * G, (s + 1) * G)`, so a batch may straddle an epoch boundary. With `shuffle=False` every
    epoch is the identity order (for evaluation passes). `indices` is the one place this order is
    computed: every subclass (in-memory arrays, random-access readers) draws the same examples for
    the same (seed, step, process), and only `_read` differs.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        shuffle: bool = True,
    ) -> None:
        super().__init__(global_batch_size, seed, process_index, process_count)
        if num_examples < 1:
            raise ValueError(f"{type(self).__name__} got an empty dataset (num_examples={num_examples})")
        self.num_examples = int(num_examples)
        self.shuffle = shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data (fractional when N % G != 0)."""
        return self.num_examples / self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            # A batch touches at most a few consecutive epochs; keep the cache tiny.
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows of global batch `step`, shape (L,)."""
        _check_step(step)
        rows = self._local_rows()
        pos = step * self.global_batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_examples)
        idx = np.empty_like(pos)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            idx[sel] = self._permutation(int(epoch))[offsets[sel]]
        return idx

    def _read(self, idx: np.ndarray) -> Batch:
        """The examples at dataset indices `idx` (L,), in that order."""
        raise NotImplementedError

    def batch(self, step: int) -> Batch:
        return self._read(self.indices(step))


class ArraySource(IndexedSource):
    """In-memory dataset in the epoch-shuffled order of :class:`IndexedSource`.

    Each process holds the whole dataset and gathers only its own rows: this keeps the global batch
    independent of the process count; the limit is that the data must fit in every host's RAM
    (larger datasets: `fewstep_jax.data.random_access.RandomAccessSource`, same batches).

    Args:
      arrays: name -> array with a shared leading dimension N (e.g. {"x": (N, H, W, C),
        "label": (N,)}).
      global_batch_size: G, divisible by `process_count`.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        shuffle: bool = True,
    ) -> None:
        if not arrays:
            raise ValueError("ArraySource needs at least one array")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if n is None or any(s != n for s in sizes.values()):
            raise ValueError(f"arrays must share a non-empty leading dimension, got sizes {sizes}")
        if n == 0:
            raise ValueError(f"ArraySource got an empty dataset (sizes {sizes})")
        super().__init__(n, global_batch_size, seed, process_index, process_count, shuffle=shuffle)
        self.arrays = arrays

    @property
    def element_spec(self) -> dict[str, ArraySpec]:
        return spec_of(self.arrays)

    def _read(self, idx: np.ndarray) -> Batch:
        return {k: v[idx] for k, v in self.arrays.items()}


class SamplerSource(_Base):
    """Infinite analytic data (e.g. 2-D mixtures).

    Global batch `step` is `sample_fn(np.random.default_rng([seed, step]), G)`; each process
    draws the whole global batch and keeps its rows, which is cheap for low-dimensional toys.

    Args:
      sample_fn: `(rng, n) -> {name: array with leading dim n}`, deterministic given `rng`.
    """

    def __init__(
        self,
        sample_fn: SampleFn,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        super().__init__(global_batch_size, seed, process_index, process_count)
        self.sample_fn = sample_fn
        # Spec from a throwaway draw of one example (separate stream from any step).
        probe = self._sample(np.random.default_rng([self.seed, 0, 1]), 1)
        self._spec = spec_of(probe)

    def _sample(self, rng: np.random.Generator, n: int) -> Batch:
        out = self.sample_fn(rng, n)
        if not isinstance(out, Mapping) or not out:
            raise ValueError(f"sample_fn must return a non-empty dict of arrays, got {type(out)}")
        batch = {k: np.asarray(v) for k, v in out.items()}
        for k, v in batch.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise ValueError(f"sample_fn returned {k!r} with shape {v.shape}; expected leading dim {n}")
        return batch

    @property
    def element_spec(self) -> dict[str, ArraySpec]:
        return dict(self._spec)

    def batch(self, step: int) -> Batch:
        _check_step(step)
        full = self._sample(np.random.default_rng([self.seed, step]), self.global_batch_size)
        rows = self._local_rows()
        return {k: v[rows] for k, v in full.items()}


class NoiseSource(_Base):
    """Data-free mode: {"noise": N(0, I) of `shape`, "label": uniform in [0, num_classes)}.

    Row `r` of global batch `step` comes from its own generator `default_rng([seed, step, r])`,
    so a process draws only its own rows (no global batch of images per host) and the result
    still does not depend on the process count. "label" is present iff `num_classes` is given.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        global_batch_size: int,
        seed: int,
        num_classes: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        super().__init__(global_batch_size, seed, process_index, process_count)
        self.shape = tuple(int(d) for d in shape)
        if any(d < 1 for d in self.shape):
            raise ValueError(f"noise shape must have positive dimensions, got {shape}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.num_classes = num_classes

    @property
    def element_spec(self) -> dict[str, ArraySpec]:
        spec = {"noise": ArraySpec(self.shape, np.dtype(np.float32))}
        if self.num_classes is not None:
            spec["label"] = ArraySpec((), np.dtype(np.int32))
        return spec

    def batch(self, step: int) -> Batch:
        _check_step(step)
        rows = self._local_rows()
        noise = np.empty((self._local, *self.shape), np.float32)
        labels = np.empty((self._local,), np.int32)
        for i, r in enumerate(range(rows.start, rows.stop)):
            rng = np.random.default_rng([self.seed, step, r])
            noise[i] = rng.standard_normal(self.shape, dtype=np.float32)
            if self.num_classes is not None:
                labels[i] = rng.integers(0, self.num_classes)
        out = {"noise": noise}
        if self.num_classes is not None:
            out["label"] = labels
        return out
