"""LoRA files diffusers loads in one call, and the same files read back (docs/guides/lora.md).

Layouts (``<name>``: the torch module name of a layer, e.g. ``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``, from the Flax path by :func:`fewstep_jax.models.state_dict.torch_key`):

  peft    ``<prefix>.<name>.lora_A.weight`` (r, in[, kh, kw]) and ``.lora_B.weight`` (out, r[, 1, 1]),
          prefix "unet" or "transformer" (``pipe.load_lora_weights(folder)``); the adapter config
          (r, lora_alpha, target_modules) in the safetensors metadata under
          ``lora_adapter_metadata`` with the prefix on each key, as diffusers writes it; with
          ``fold_alpha`` no metadata and lora_B times alpha / r (any reader then takes alpha = r).
  kohya   ``lora_unet_<name, "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a
          scalar), the layout of kohya-ss sd-scripts for the UNet families.

Our factors are lora_a (in, r) / (kh, kw, in, r) and lora_b (r, out) (lora/adapters.py); lora_A is
lora_a transposed to torch's (out, in[, kh, kw]) layout, lora_B is lora_b transposed. Files are
written and read with ``safetensors.numpy`` (no torch). Reading maps every key back to a layer of
the given model by name; a key for a layer the model lacks (a file for another architecture) or a
factor of the wrong shape is a UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from fewstep_jax.errors import UserError, require
from fewstep_jax.lora.adapters import SUFFIX_A, SUFFIX_B, LoraSpec, adapter_layers, spec_of
from fewstep_jax.models.state_dict import torch_key

METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights(folder) reads
LAYOUTS = ("peft", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet_"}


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """Adapters read from a file: ``adapters`` (our tree, float32), ``specs`` (one LoraSpec per
    (rank, alpha) group, targets the exact layer paths; pass them to ``lora_module``), the file's
    ``layout`` and ``prefix``."""

    adapters: Any
    specs: tuple[LoraSpec, ...]
    layout: str
    prefix: str


def module_name(layer: Sequence[str], list_names: Collection[str]) -> str:
    """Torch module name of a layer path (module path..., kernel name)."""
    return torch_key((*layer[:-1], "kernel"), list_names).removesuffix(".weight")


def _to_torch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.ndim == 4:  # (kh, kw, in, r) -> (r, in, kh, kw); (r, out) -> (out, r, 1, 1)
        return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    return a.T, b.T


def _from_torch(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if down.ndim == 4:
        return down.transpose(2, 3, 1, 0), up[:, :, 0, 0].T
    return down.T, up.T


def lora_state_dict(
    adapters: Any,
    specs: LoraSpec | Sequence[LoraSpec],
    list_names: Collection[str],
    *,
    prefix: str = "unet",
    layout: str = "peft",
    fold_alpha: bool = False,
    dtype: Any = np.float32,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of ``adapters`` in ``layout`` (see the module docstring).

    specs: the spec the adapters were trained with, or one per layer group (a LoraFile's)."""
    if layout not in LAYOUTS:
        raise UserError(f"LoRA layout must be one of {LAYOUTS}, got {layout!r}")
    specs = (specs,) if isinstance(specs, LoraSpec) else tuple(specs)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for layer, (a, b) in sorted(adapter_layers(adapters).items()):
        spec = spec_of("/".join(layer[:-1]), specs)
        down, up = _to_torch(np.asarray(a, np.float32), np.asarray(b, np.float32))
        name = module_name(layer, list_names)
        if layout == "kohya":
            if prefix not in KOHYA_PREFIX:
                raise UserError(f"the kohya layout is written for {sorted(KOHYA_PREFIX)}, not {prefix!r}")
            key = KOHYA_PREFIX[prefix] + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.astype(dtype)
            tensors[f"{key}.lora_up.weight"] = up.astype(dtype)
            tensors[f"{key}.alpha"] = np.asarray(spec.alpha, dtype)
            continue
        if fold_alpha:
            up = up * spec.scaling
        tensors[f"{prefix}.{name}.lora_A.weight"] = down.astype(dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = up.astype(dtype)
        ranks[name], alphas[name] = spec.rank, spec.alpha
    metadata = {"format": "pt"}
    if layout == "peft" and not fold_alpha:
        metadata[METADATA_KEY] = json.dumps(_peft_config(prefix, ranks, alphas), indent=2, sort_keys=True)
    return tensors, metadata


def _peft_config(prefix: str, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """peft's LoraConfig fields with diffusers' "<prefix>." on each key: the most common rank and
    alpha, with rank_pattern / alpha_pattern for the layers that differ (by full module name)."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }
    return {f"{prefix}.{k}": v for k, v in config.items()}


def save_lora(
    folder: str,
    adapters: Any,
    specs: LoraSpec | Sequence[LoraSpec],
    list_names: Collection[str],
    *,
    weight_name: str = WEIGHT_NAME,
    **kwargs: Any,
) -> str:
    """Write the adapters to ``folder/weight_name`` (see :func:`lora_state_dict` for kwargs);
    written to a temporary name and renamed, so an existing file is never left half-written.
    Returns the file's path."""
    save_file = require("safetensors.numpy", "writing LoRA files").save_file
    tensors, metadata = lora_state_dict(adapters, specs, list_names, **kwargs)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, weight_name)
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    st = require("safetensors", "reading LoRA files")
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"LoRA file {path!r} not found")
    try:
        with st.safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:  # safetensors' own error types for truncated / corrupt headers
        raise UserError(f"cannot read LoRA file {path!r} ({type(err).__name__}: {err})") from None


def load_lora(
    path: str, kernels: Mapping[tuple[str, ...], tuple[int, ...]], list_names: Collection[str]
) -> LoraFile:
    """The adapters of a LoRA file (peft or kohya layout, detected) for the model whose kernels are
    ``kernels`` ({Flax param path: shape}, e.g. ``state_dict.abstract_param_shapes``).

    Alpha: kohya's ``.alpha`` tensors; peft's metadata (``lora_alpha`` and ``alpha_pattern``);
    without either, alpha = r (peft's and diffusers' default)."""
    tensors, metadata = _read(path)
    layers = {p: s for p, s in kernels.items() if p[-1] == "kernel"}
    by_name = {module_name(p, list_names): p for p in layers}
    by_kohya = {n.replace(".", "_"): n for n in by_name}
    groups: dict[str, dict[str, np.ndarray]] = {}
    layout, prefix = None, ""
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:(unet|transformer)\.)?(.+)\.lora_([AB])\.weight", key)
        k = re.fullmatch(r"lora_(unet)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if m:
            this, prefix, name, part = "peft", m[1] or "", m[2], {"A": "down", "B": "up"}[m[3]]
        elif k:
            this, prefix, part = "kohya", k[1], k[3].split(".")[0].removeprefix("lora_")
            name = by_kohya.get(k[2], k[2])
        else:
            raise UserError(f"{path}: key {key!r} is neither a peft nor a kohya LoRA key")
        if layout not in (None, this):
            raise UserError(f"{path} mixes the peft and kohya layouts (key {key!r})")
        layout = this
        if name not in by_name:
            raise UserError(f"{path}: key {key!r} names layer {name!r}, which this model does not have")
        groups.setdefault(name, {})[part] = value
    if not groups:
        raise UserError(f"{path} holds no LoRA weights")
    config = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    config = {k.removeprefix(f"{prefix}."): v for k, v in config.items()}
    flat, per_layer = {}, {}
    for name, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            raise UserError(f"{path}: layer {name!r} lacks its {'up' if 'down' in parts else 'down'} factor")
        a, b = _from_torch(np.asarray(parts["down"], np.float32), np.asarray(parts["up"], np.float32))
        layer = by_name[name]
        kernel = tuple(layers[layer])
        rank = a.shape[-1]
        if (*a.shape[:-1], b.shape[-1]) != kernel or b.shape[0] != rank:
            raise UserError(
                f"{path}: layer {name!r} factors {parts['down'].shape} / {parts['up'].shape} do not "
                f"fit its kernel {kernel} (Flax layout)"
            )
        if "alpha" in parts:
            alpha = float(np.asarray(parts["alpha"]).reshape(-1)[0])  # stored 0-d or (1,)
        else:
            alpha = float(config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", rank)))
        flat[(*layer[:-1], layer[-1] + SUFFIX_A)] = a
        flat[(*layer[:-1], layer[-1] + SUFFIX_B)] = b
        per_layer["/".join(layer[:-1])] = (rank, alpha, a.ndim == 4)
    specs = []
    for rank, alpha, conv in sorted(set(per_layer.values())):
        paths = sorted(p for p, v in per_layer.items() if v == (rank, alpha, conv))
        targets = "|".join(re.escape(p) for p in paths)
        specs.append(LoraSpec(targets=targets, rank=rank, alpha=alpha, convs=conv))
    return LoraFile(traverse_util.unflatten_dict(flat), tuple(specs), layout, prefix)


__all__ = [
    "LAYOUTS",
    "METADATA_KEY",
    "WEIGHT_NAME",
    "LoraFile",
    "load_lora",
    "lora_state_dict",
    "module_name",
    "save_lora",
]
