"""Prompt sources: rows of text (and, for image-text data, uint8 images) read by row range.

A :class:`TextSource` is what the prompt / latent cache writer consumes
(docs/guides/latent_models.md, "Prompt and latent caches"): `num_rows` rows, `read(start, stop)`
-> (texts, images (n, H, W, C) uint8 or None) for rows [start, stop), and `identity`, a small
JSON dict saying what the rows are (a file's path and the sha256 of its bytes, a TFDS name /
split / version / size), which the cache's manifest records so that a cache of other prompts is
refused. Each writing process reads only its own row range.

Sources:
  prompt_file(path, field)   a .txt file (one prompt per line, blank lines skipped) or a .jsonl
                             file (one JSON object per line, the prompt in `field`, by default the
                             first of "prompt" / "text" / "caption" the first line has)
  prompt_list(prompts)       prompts in memory
  record_source(container)   a random-access container of record dicts (`__len__`, `__getitem__`,
                             optionally `__getitems__`: data/random_access.py), the text in
                             `text_key` (str or utf-8 bytes), the image in `image_key` when given
  tfds_text_source(name)     a prepared ArrayRecord TFDS split through `tfds_data_source`
Bad input is a UserError of one line: a missing or empty file, a line that is not JSON or lacks the
field (with its line number), a record without the text key (with its row).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fewstep_jax.data.random_access import RandomAccess, read_records
from fewstep_jax.errors import UserError

# read(start, stop) -> (texts of rows [start, stop), uint8 images (n, H, W, C) or None)
ReadRows = Callable[[int, int], tuple[list[str], "np.ndarray | None"]]
JSONL_FIELDS = ("prompt", "text", "caption")  # the field a .jsonl line's prompt is in, by default


@dataclasses.dataclass(frozen=True)
class TextSource:
    """`num_rows` rows of text (and images when `has_images`), read by row range.

    identity: JSON-serialisable description of the rows (recorded in a cache's manifest; two
      sources with equal identities give the same rows).
    """

    num_rows: int
    read: ReadRows
    identity: Mapping[str, Any]
    has_images: bool = False


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of a list of texts (each length-prefixed, so ["ab"] and ["a", "b"] differ)."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _read_text(path: str | os.PathLike) -> tuple[str, str]:
    """(text, sha256 of its bytes) of a prompt file; missing / empty / non-utf-8 is a UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path!r} is not utf-8 text ({e})") from None
    return text, hashlib.sha256(data).hexdigest()


def read_txt_prompts(text: str, where: str) -> list[str]:
    """One prompt per line of `text`, trailing whitespace stripped, blank lines skipped."""
    prompts = [line.rstrip() for line in text.splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"prompt file {where!r} has no prompts (every line is blank)")
    return prompts


def read_jsonl_prompts(text: str, where: str, field: str | None = None) -> list[str]:
    """The `field` string of each JSON-object line of `text` (blank lines skipped); field None:
    the first of JSONL_FIELDS the first object has, then every line must have it."""
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}:{number}: not a JSON line ({e})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}:{number}: expected a JSON object, got {type(record).__name__}")
        if field is None:
            field = next((f for f in JSONL_FIELDS if f in record), None)
            if field is None:
                raise UserError(
                    f"{where}:{number}: no prompt field: the line has {sorted(record)}, none of the "
                    f"default fields {list(JSONL_FIELDS)} (pass field=...)"
                )
        if field not in record:
            raise UserError(f"{where}:{number}: no field {field!r} (the line has {sorted(record)})")
        value = record[field]
        if not isinstance(value, str):
            raise UserError(f"{where}:{number}: field {field!r} is {type(value).__name__}, not a string")
        prompts.append(value)
    if not prompts:
        raise UserError(f"prompt file {where!r} has no prompts (every line is blank)")
    return prompts


def _list_reader(texts: list[str]) -> ReadRows:
    return lambda start, stop: (texts[start:stop], None)


def prompt_file(path: str | os.PathLike, field: str | None = None) -> TextSource:
    """The prompts of a .txt or .jsonl file (module docstring), read whole and checked now; the
    identity is the file's absolute path, the sha256 of its bytes and the field."""
    path = os.fspath(path)
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".txt", ".jsonl"):
        raise UserError(
            f"prompt file {path!r}: expected a .txt or .jsonl file, got {kind or 'no extension'!r}"
        )
    text, digest = _read_text(path)
    if kind == ".txt":
        if field is not None:
            raise UserError(
                f"prompt file {path!r}: field={field!r} is for .jsonl files; a .txt file has one "
                "prompt a line"
            )
        prompts = read_txt_prompts(text, path)
    else:
        prompts = read_jsonl_prompts(text, path, field)
    identity = {"kind": kind[1:], "path": os.path.abspath(path), "sha256": digest, "field": field}
    return TextSource(len(prompts), _list_reader(prompts), identity)


def prompt_list(prompts: Sequence[str]) -> TextSource:
    """Prompts in memory; the identity is the sha256 of the texts (`texts_digest`)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise UserError("prompt_list: no prompts")
    bad = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
    if bad:
        raise UserError(f"prompt_list: prompts must be str, got {bad}")
    return TextSource(len(texts), _list_reader(texts), {"kind": "list", "sha256": texts_digest(texts)})


def _text_of(record: Mapping[str, Any], key: str, row: int, name: str) -> str:
    if key not in record:
        raise UserError(f"{name}: row {row} has no text field {key!r} (it has {sorted(record)})")
    value = record[key]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):  # TFDS Text features decode to bytes
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise UserError(f"{name}: row {row} field {key!r} is {type(value).__name__}, not text")
    return value


def record_source(
    container: RandomAccess,
    text_key: str = "text",
    image_key: str | None = None,
    *,
    identity: Mapping[str, Any] | None = None,
    name: str = "record source",
) -> TextSource:
    """Rows of a random-access container of record dicts: the text in `text_key`, and, when
    `image_key` is given, a uint8 image (H, W, C) (or (H, W): C = 1) in `image_key`, the same size
    in every row (resize beforehand: the cache stores fixed-shape latents). Rows are read only
    when asked for. identity: what the container is (default: its type and length, which does not
    tell two containers of the same size apart: pass one for anything but a test)."""
    if not hasattr(container, "__len__") or not hasattr(container, "__getitem__"):
        raise UserError(
            f"{name}: a random-access container needs __len__ and __getitem__, got {type(container)}"
        )
    n = len(container)
    if n < 1:
        raise UserError(f"{name}: the container is empty")

    def read(start: int, stop: int) -> tuple[list[str], np.ndarray | None]:
        records = read_records(container, range(start, stop))
        texts = [_text_of(r, text_key, start + i, name) for i, r in enumerate(records)]
        if image_key is None:
            return texts, None
        images = []
        for i, r in enumerate(records):
            if image_key not in r:
                raise UserError(
                    f"{name}: row {start + i} has no image field {image_key!r} (it has {sorted(r)})"
                )
            image = np.asarray(r[image_key])
            image = image[..., None] if image.ndim == 2 else image
            if image.dtype != np.uint8 or image.ndim != 3:
                raise UserError(
                    f"{name}: row {start + i} image {image_key!r} must be uint8 (H, W, C), got "
                    f"{image.dtype} {image.shape}"
                )
            if images and image.shape != images[0].shape:
                raise UserError(
                    f"{name}: row {start + i} image is {image.shape}, row {start} is {images[0].shape}: "
                    "every image must have one size (resize beforehand)"
                )
            images.append(image)
        return texts, np.stack(images) if images else None

    if identity is None:
        identity = {"kind": "container", "type": type(container).__name__, "num_rows": n}
    return TextSource(
        n, read, {**identity, "text_key": text_key, "image_key": image_key}, image_key is not None
    )


def tfds_text_source(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    text_key: str = "caption",
    image_key: str | None = None,
) -> TextSource:
    """The text field (and the images, with `image_key`) of a prepared ArrayRecord TFDS split,
    read by row range through `tfds_source.tfds_data_source`; the identity is the dataset's name,
    split, version and size (the split is not hashed: reading it whole is what a cache avoids)."""
    from fewstep_jax.data.tfds_source import tfds_data_source

    try:  # tfds_data_source checks that its `image_key` is a feature: here the text field
        container = tfds_data_source(name, split, data_dir, image_key=text_key)
    except ValueError as e:
        if f"feature {text_key!r}" not in str(e):
            raise
        features = str(e).partition("; ")[2]
        raise UserError(f"TFDS dataset {name!r} has no text field {text_key!r}; {features}") from None
    info = getattr(container, "dataset_info", None)
    if image_key is not None and info is not None and image_key not in info.features:
        raise UserError(
            f"TFDS dataset {name!r} has no image field {image_key!r}; features: {list(info.features)}"
        )
    identity = {
        "kind": "tfds",
        "name": name,
        "split": split,
        "version": str(info.version) if info is not None else None,
        "num_rows": len(container),
    }
    return record_source(container, text_key, image_key, identity=identity, name=f"TFDS {name!r}")


__all__ = [
    "JSONL_FIELDS",
    "TextSource",
    "prompt_file",
    "prompt_list",
    "read_jsonl_prompts",
    "read_txt_prompts",
    "record_source",
    "texts_digest",
    "tfds_text_source",
]
