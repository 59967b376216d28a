"""Read a component's safetensors weights (single file, sharded index, fp16/bf16 variants).

Never unpickles: a folder holding only `.bin` / `.pt` weights is an error saying to convert
them. Arrays come back as numpy float32 (bf16 through ml_dtypes), keyed by the torch names.
"""

from __future__ import annotations

import json
import os

import numpy as np

from fewstep_jax.errors import UserError, require

DIFFUSERS_STEM = "diffusion_pytorch_model"  # diffusers models
TRANSFORMERS_STEM = "model"  # transformers models (text encoders)


def _candidates(stem: str, variant: str | None) -> list[str]:
    names = []
    if variant:
        names += [f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"]
    names += [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    return names


def weights_file(folder: str, variant: str | None = None) -> str:
    """Path of the weights of component `folder`: the variant's (e.g. "fp16") if present, else
    the plain file; a sharded `*.safetensors.index.json` counts as a file."""
    if not os.path.isdir(folder):
        raise UserError(f"component folder {folder!r} not found")
    for stem in (DIFFUSERS_STEM, TRANSFORMERS_STEM):
        for name in _candidates(stem, variant):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    pickled = [f for f in sorted(os.listdir(folder)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (
        f"; it holds only pickled weights {pickled}, which are never unpickled here: convert them "
        "with `save_pretrained(..., safe_serialization=True)`"
        if pickled
        else ""
    )
    raise UserError(f"no safetensors weights in {folder!r}{hint}")


def load_weights(path: str) -> dict[str, np.ndarray]:
    """{torch key: float32 numpy array} of a .safetensors file or a sharded index .json."""
    load_file = require("safetensors.numpy", "reading safetensors weights").load_file
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"cannot read the sharded weights index {path!r}: {err}") from None
        folder = os.path.dirname(path)
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = load_weights(os.path.join(folder, shard))
            wanted = {k for k, v in weight_map.items() if v == shard}
            missing = sorted(wanted - set(part))
            if missing:
                raise UserError(f"shard {shard!r} of {path!r} lacks the keys its index lists: {missing[:5]}")
            state.update({k: part[k] for k in wanted})
        return state
    if not os.path.isfile(path):
        raise UserError(f"weights file {path!r} not found")
    try:
        raw = load_file(path)
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise UserError(f"cannot read safetensors file {path!r} ({type(err).__name__}: {err})") from None
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}


def load_component_weights(folder: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """The weights of one pipeline component folder (unet/, vae/, text_encoder/, ...)."""
    return load_weights(weights_file(folder, variant))


def read_json(path: str) -> dict:
    """A config / model_index JSON file as a dict; a missing or malformed file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path!r} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f"{path!r} is not valid JSON: {err}") from None
