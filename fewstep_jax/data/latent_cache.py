"""Caches of text embeddings and VAE latents on disk: written once per process, read by index.

A cache directory (docs/guides/latent_models.md, "Prompt and latent caches") holds N rows of
fixed-shape arrays, one memory-mappable `.npy` file per key and part, written by `process_count`
writers, each its contiguous slice of rows (`part_rows`):

    manifest.json                    written by process 0 (`MANIFEST`)
    null/<key>.npy                   the null (empty / negative prompt) condition, leading dim 1
    part-00000-of-00002/part.json    rows [start, stop) of this part, its keys, shapes, dtypes
    part-00000-of-00002/<key>.npy    (stop - start, *shape) of each key: text_states, text_mask,
    part-00001-of-00002/...          pooled, ... (the condition) and "latents" (h, w, C) if any

The manifest records the `fingerprint` (what the rows were computed from: pipeline folder,
family, hashes of the prompts and of the encoder weights, options) and its sha256 `cache_id`,
which every part repeats. Each part and the null condition are written into a temporary directory
renamed into place, and the manifest into a temporary file replaced into place, so a crash leaves
either nothing or a complete piece: `open_latent_cache` refuses a cache whose manifest or any
part is missing (a writer has not finished), whose part belongs to another write, or whose file
is truncated, each with one line; given the fingerprint the caller expects, it refuses a stale
cache naming the entry that differs. Rows do not depend on the number of writing processes.

`LatentCache` is a random-access container (`__len__`, `__getitem__`, `__getitems__` of dicts of
numpy arrays, data/random_access.py), and `cache_source` serves it as `RandomAccessSource`
batches {"label": the condition dict, "x": latents} (the label alone for data-free methods),
split per process as every `IndexedSource`. Numpy only: the encoding is
`pipelines/encode_cache.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fewstep_jax.data.random_access import RandomAccessSource
from fewstep_jax.errors import UserError

MANIFEST = "manifest.json"
PART_MANIFEST = "part.json"
NULL_DIR = "null"
LATENTS = "latents"  # the key of the VAE latents; every other key is part of the condition
FORMAT = "fewstep-latent-cache"
VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9_]+$")  # keys become file names


# ---- layout --------------------------------------------------------------------------------------
def part_rows(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [start, stop) that process `process_index` of `process_count` writes: contiguous,
    the first `num_rows % process_count` parts one row longer."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    base, extra = divmod(int(num_rows), int(process_count))
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def part_name(process_index: int, process_count: int) -> str:
    return f"part-{process_index:05d}-of-{process_count:05d}"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cache_id(fingerprint: Mapping[str, Any], num_rows: int, process_count: int) -> str:
    """sha256 naming one write: the fingerprint, the row count and the split into parts."""
    blob = canonical_json({"fingerprint": fingerprint, "count": int(num_rows), "parts": int(process_count)})
    return hashlib.sha256(blob.encode()).hexdigest()


# ---- hashes of files (the encoder weights, the prompts) --------------------------------------------
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a file once


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (memoised on path, size and mtime within the process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def files_digest(root: str, names: Sequence[str]) -> str:
    """sha256 over every file under `root`/name for each name (a file or a folder, recursively),
    of each file's path relative to `root` and the sha256 of its bytes; absent names are skipped
    (a null component has no folder)."""
    h = hashlib.sha256()
    for name in sorted(names):
        top = os.path.join(root, name)
        if os.path.isfile(top):
            files = [top]
        else:
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs)
        for path in files:
            h.update(f"{os.path.relpath(path, root)}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


# ---- writing -------------------------------------------------------------------------------------
def _spec(shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).str}


def _check_keys(arrays: Mapping[str, Any], what: str) -> None:
    bad = [k for k in arrays if not _KEY.match(str(k))]
    if bad:
        raise UserError(f"{what}: cache keys must be letters, digits and '_', got {bad}")


def _write_json(path: str, obj: Any) -> None:
    """JSON written to a temporary file replaced into place (a reader sees all or nothing)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(
            f"{what} {path!r} is corrupt ({type(e).__name__}: {e}); write the cache again"
        ) from None


def _publish(tmp: str, final: str) -> None:
    """Rename a finished temporary directory into place, replacing what a crashed write left (no
    reader can hold it: a cache opens only with its manifest, written last)."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)


def _write_rows(folder: str, rows: int, batches: Iterable[Mapping[str, np.ndarray]], what: str) -> dict:
    """Streams `batches` (dicts of (b, ...) arrays, `rows` rows in all) into <key>.npy memmaps of
    `folder`; returns {key: spec of one row}."""
    files: dict[str, np.memmap] = {}
    done = 0
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if not files:
            _check_keys(batch, what)
            for k, v in batch.items():
                path = os.path.join(folder, f"{k}.npy")
                files[k] = np.lib.format.open_memmap(path, "w+", v.dtype, (rows, *v.shape[1:]))
        if set(batch) != set(files):
            raise UserError(f"{what}: a batch has keys {sorted(batch)}, the first had {sorted(files)}")
        sizes = {k: v.shape[0] for k, v in batch.items()}
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()) or done + n > rows:
            raise UserError(f"{what}: batch of sizes {sizes} after {done} of {rows} rows")
        for k, v in batch.items():
            if v.shape[1:] != files[k].shape[1:]:
                raise UserError(f"{what}: {k!r} has shape {v.shape[1:]} here, {files[k].shape[1:]} before")
            files[k][done : done + n] = v
        done += n
    if done != rows:
        raise UserError(f"{what}: got {done} rows, expected {rows}")
    specs = {k: _spec(m.shape[1:], m.dtype) for k, m in files.items()}
    for m in files.values():
        m.flush()
    return specs


def write_cache_part(
    cache_dir: str | os.PathLike,
    fingerprint: Mapping[str, Any],
    num_rows: int,
    batches: Iterable[Mapping[str, np.ndarray]],
    null: Mapping[str, np.ndarray] | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
    info: Mapping[str, Any] | None = None,
) -> bool:
    """Writes this process's part of a cache of `num_rows` rows; returns False when that part was
    already written by the same write (`batches` is then not iterated: a generator encodes nothing).

    fingerprint: JSON dict of what the rows are computed from (same on every process).
    batches: this process's rows [start, stop) of `part_rows`, in order, as dicts {key: (b, ...)}
      (the condition keys and, optionally, LATENTS), any batch sizes.
    null: process 0 only: the null condition {key: (1, ...)} (the same keys as the condition).
    info: JSON dict the manifest records without comparing it (e.g. the pipeline folder's path,
      which may move without making the cache stale).
    Process 0 writes the manifest after its part; the cache opens once every part is written.
    A directory holding another cache (another fingerprint or split) is refused: write a new one.
    """
    cache_dir = os.fspath(cache_dir)
    ident = cache_id(fingerprint, num_rows, process_count)
    start, stop = part_rows(num_rows, process_index, process_count)
    name = part_name(process_index, process_count)
    os.makedirs(cache_dir, exist_ok=True)
    manifest_path = os.path.join(cache_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        other = _read_json(manifest_path, "cache manifest")
        if other.get("cache_id") != ident:
            raise UserError(
                f"{cache_dir!r} holds another cache (cache_id {str(other.get('cache_id'))[:12]}, this write "
                f"{ident[:12]}): remove it or write into a new directory"
            )
    part_dir = os.path.join(cache_dir, name)
    part_json = os.path.join(part_dir, PART_MANIFEST)
    if os.path.isfile(part_json):
        if _read_json(part_json, "cache part manifest").get("cache_id") != ident:
            raise UserError(
                f"{part_dir!r} belongs to another cache: remove {cache_dir!r} or write into a new directory"
            )
        written = True
    else:
        written = False
        tmp = os.path.join(cache_dir, f".{name}.tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            what = f"cache part {name}"
            specs = _write_rows(tmp, stop - start, batches, what) if stop > start else {}
            _write_json(
                os.path.join(tmp, PART_MANIFEST),
                {"cache_id": ident, "start": start, "stop": stop, "keys": specs},
            )
            _publish(tmp, part_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if process_index != 0 or os.path.isfile(manifest_path):  # the manifest: same id (checked above)
        return not written
    if null is None:
        raise UserError("write_cache_part: process 0 writes the null condition: pass null=")
    _check_keys(null, "null condition")
    keys = _read_json(part_json, "cache part manifest")["keys"]
    condition = sorted(k for k in keys if k != LATENTS)
    if sorted(null) != condition:
        raise UserError(f"the null condition has keys {sorted(null)}, the rows' condition {condition}")
    null_dir = os.path.join(cache_dir, NULL_DIR)
    tmp = os.path.join(cache_dir, f".{NULL_DIR}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    for k, v in null.items():
        np.save(os.path.join(tmp, f"{k}.npy"), np.asarray(v)[:1])
    _publish(tmp, null_dir)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "cache_id": ident,
        "fingerprint": fingerprint,
        "info": dict(info or {}),
        "count": int(num_rows),
        "process_count": int(process_count),
        "parts": [
            {
                "name": part_name(p, process_count),
                **dict(zip(("start", "stop"), part_rows(num_rows, p, process_count))),
            }
            for p in range(process_count)
        ],
        "keys": keys,
        "null": {k: _spec(np.shape(v)[1:], np.asarray(v).dtype) for k, v in null.items()},
    }
    _write_json(manifest_path, manifest)
    return not written


# ---- reading -------------------------------------------------------------------------------------
def _open_npy(path: str, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A read-only memmap of a .npy file checked against its expected shape, dtype and byte size."""
    if not os.path.isfile(path):
        raise UserError(f"{where}: {os.path.basename(path)} is missing; write the cache again")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header = read_header(f)  # (shape, fortran_order, dtype)
        except (ValueError, SyntaxError, EOFError) as e:
            raise UserError(
                f"{where}: {os.path.basename(path)} is not a .npy file ({e}); write the cache again"
            ) from None
        offset = f.tell()
    got_shape, _, got_dtype = header
    if tuple(got_shape) != shape or np.dtype(got_dtype) != dtype:
        raise UserError(
            f"{where}: {os.path.basename(path)} is {np.dtype(got_dtype)} {tuple(got_shape)}, the "
            f"manifest says {dtype} {shape}; write the cache again"
        )
    size, want = os.path.getsize(path), offset + int(np.prod(shape)) * dtype.itemsize
    if size != want:
        raise UserError(
            f"{where}: {os.path.basename(path)} is truncated ({size} bytes, expected {want}); "
            "write the cache again"
        )
    return np.load(path, mmap_mode="r")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON trees differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "fingerprint"]


class LatentCache:
    """A written cache (see the module docstring): N rows of {key: array} read by index.

    keys: the keys rows hold (default all: the condition keys and LATENTS when written);
    null_condition: {key: (1, ...)} the empty / negative prompt's condition; fingerprint and
    manifest: what the manifest says.
    """

    def __init__(
        self, directory: str, manifest: Mapping[str, Any], keys: Sequence[str] | None = None
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        specs = manifest["keys"]
        keys = sorted(specs) if keys is None else list(keys)
        unknown = [k for k in keys if k not in specs]
        if unknown:
            raise UserError(f"cache {directory!r} has no key(s) {unknown}; it has {sorted(specs)}")
        self.keys = keys
        self._starts = np.asarray([p["start"] for p in manifest["parts"]], np.int64)
        self._parts: list[dict[str, np.ndarray]] = []
        for part in manifest["parts"]:
            where = f"cache {directory!r} part {part['name']}"
            folder = os.path.join(directory, part["name"])
            rows = part["stop"] - part["start"]
            self._parts.append(
                {
                    k: _open_npy(
                        os.path.join(folder, f"{k}.npy"),
                        (rows, *specs[k]["shape"]),
                        np.dtype(specs[k]["dtype"]),
                        where,
                    )
                    for k in keys
                }
                if rows
                else {}
            )
        where = f"cache {directory!r} null condition"
        self.null_condition = {
            k: np.asarray(
                _open_npy(
                    os.path.join(directory, NULL_DIR, f"{k}.npy"),
                    (1, *s["shape"]),
                    np.dtype(s["dtype"]),
                    where,
                )
            )
            for k, s in manifest["null"].items()
        }

    @property
    def fingerprint(self) -> Mapping[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def condition_keys(self) -> list[str]:
        return [k for k in self.keys if k != LATENTS]

    @property
    def has_latents(self) -> bool:
        return LATENTS in self.keys

    def view(self, keys: Sequence[str]) -> LatentCache:
        """The same cache reading only `keys` (e.g. the condition keys for data-free methods)."""
        return LatentCache(self.directory, self.manifest, keys)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Records of `indices` in that order; one gather per part and key."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(
                f"cache index out of range [0, {n}): {idx[(idx < -n) | (idx >= n)][:5].tolist()}"
            )
        if not idx.size:
            return []
        idx = np.where(idx < 0, idx + n, idx)
        # parts may be empty (fewer rows than writers): the last part starting at or before i
        part_of = np.searchsorted(self._starts, idx, side="right") - 1
        specs = self.manifest["keys"]
        out = {k: np.empty((idx.size, *specs[k]["shape"]), specs[k]["dtype"]) for k in self.keys}
        for p in np.unique(part_of):
            sel = part_of == p
            local = idx[sel] - self._starts[p]
            for k in self.keys:
                out[k][sel] = self._parts[p][k][local]
        return [{k: v[i] for k, v in out.items()} for i in range(idx.size)]

    def to_batch(self, records: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
        """Records -> {"label": {condition key: (B, ...)}, "x": latents (B, h, w, C) when read}."""
        batch: dict[str, Any] = {"label": {k: np.stack([r[k] for r in records]) for k in self.condition_keys}}
        if self.has_latents:
            batch["x"] = np.stack([r[LATENTS] for r in records])
        return batch


def open_latent_cache(
    cache_dir: str | os.PathLike,
    expect: Mapping[str, Any] | None = None,
    *,
    keys: Sequence[str] | None = None,
) -> LatentCache:
    """The cache in `cache_dir`, every part checked (missing, foreign or truncated: one line).

    expect: the fingerprint the caller computes now (e.g. `pipelines.encode_cache.cache_fingerprint`);
      a cache written from anything else is refused as stale, naming what differs.
    keys: the keys to read (default all).
    """
    cache_dir = os.fspath(cache_dir)
    if not os.path.isdir(cache_dir):
        raise UserError(f"cache directory {cache_dir!r} not found")
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(
            f"{cache_dir!r} is not a complete cache: it has no {MANIFEST} (its process 0 writer "
            "has not finished)"
        )
    manifest = _read_json(path, "cache manifest")
    required = (
        "format",
        "version",
        "cache_id",
        "fingerprint",
        "count",
        "process_count",
        "parts",
        "keys",
        "null",
    )
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing or manifest.get("format") != FORMAT:
        raise UserError(
            f"cache manifest {path!r} is corrupt (missing {missing or 'the format tag'}); "
            "write the cache again"
        )
    if manifest["version"] != VERSION:
        raise UserError(
            f"cache {cache_dir!r} has format version {manifest['version']}, this reader {VERSION}"
        )
    if manifest["cache_id"] != cache_id(
        manifest["fingerprint"], manifest["count"], manifest["process_count"]
    ):
        raise UserError(f"cache manifest {path!r} is corrupt (its cache_id does not match its content)")
    if expect is not None:
        diff = _differences(manifest["fingerprint"], json.loads(canonical_json(expect)))
        if diff:
            raise UserError(
                f"cache {cache_dir!r} is stale: it was written from other inputs ({', '.join(diff)} differ); "
                "write a new cache"
            )
    for part in manifest["parts"]:
        part_json = os.path.join(cache_dir, part["name"], PART_MANIFEST)
        if not os.path.isfile(part_json):
            raise UserError(
                f"cache {cache_dir!r} is incomplete: {part['name']} is missing (its writer has not "
                "finished or crashed)"
            )
        info = _read_json(part_json, "cache part manifest")
        if info.get("cache_id") != manifest["cache_id"] or [info.get("start"), info.get("stop")] != [
            part["start"],
            part["stop"],
        ]:
            raise UserError(
                f"cache {cache_dir!r}: {part['name']} belongs to another write; write the cache again"
            )
        if part["stop"] > part["start"] and info.get("keys") != manifest["keys"]:
            raise UserError(
                f"cache {cache_dir!r}: {part['name']} has keys {info.get('keys')}, the manifest "
                f"{manifest['keys']}"
            )
    return LatentCache(cache_dir, manifest, keys)


def cache_source(
    cache: LatentCache,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    shuffle: bool = True,
    latents: bool | None = None,
) -> RandomAccessSource:
    """Batches {"label": condition dict, "x": latents (B, h, w, C)} of a cache, this process's rows of
    each global batch as every `IndexedSource` (the same for any process count).

    latents: False reads the condition only ({"label": ...}: TDM, DMD); None: whether the cache has
    latents.
    """
    if latents is None:
        latents = cache.has_latents
    if latents and LATENTS not in cache.manifest["keys"]:
        raise UserError(f"cache {cache.directory!r} has no latents (it was written from prompts only)")
    keys = [k for k in cache.keys if k != LATENTS] + ([LATENTS] if latents else [])
    view = cache.view(keys)
    return RandomAccessSource(
        view,
        global_batch_size,
        seed,
        process_index,
        process_count,
        shuffle=shuffle,
        convert=view.to_batch,
        name=f"cache {cache.directory!r}",
    )


__all__ = [
    "LATENTS",
    "MANIFEST",
    "LatentCache",
    "cache_id",
    "cache_source",
    "file_digest",
    "files_digest",
    "open_latent_cache",
    "part_name",
    "part_rows",
    "write_cache_part",
]
