"""Flax params <-> PyTorch state dicts, and the exported folder (safetensors + fewstep.json).

Key rule (one for every network, `fewstep_jax.models.diffusers_key`): the Flax path joined by
".", diffusers' ModuleList names `down_blocks_0 -> down_blocks.0`, leaves kernel/scale/embedding
-> weight; Dense kernels (in, out) -> (out, in), Conv kernels HWIO -> OIHW.

An exported folder holds:
  model.safetensors          weights in torch layout (`diffusion_pytorch_model.safetensors` when
                             the network is a plain t-only UNet: diffusers layout, see below)
  fewstep.json               {architecture, model, data_shape, input_shape, weights, dtype, path,
                             prediction, method, student_form, uses_s, sampler, time_offset,
                             ...meta}: what this project's loaders (`torch_models.load_exported`)
                             read
  config.json                diffusers layout only: UNet2DModel's config and nothing else, so
                             `UNet2DModel.from_pretrained(folder)` loads it without a warning
  README.md                  how to load and sample it in plain PyTorch
  torch_models.py, torch_sampler.py   the PyTorch mirrors and samplers (no JAX needed)

Writing the folder needs numpy and safetensors only (bfloat16 through ml_dtypes, a JAX
dependency); torch is needed to load it (`torch_models`) and for `fewstep_jax.export.check`.
Folders of format_version 1 kept the metadata inside config.json (`{"fewstep": {...}}`); the
loaders still read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util

from fewstep_jax.errors import UserError, require
from fewstep_jax.models import build_model, diffusers_config, to_diffusers_state_dict
from fewstep_jax.models.state_dict import params_from_torch
from fewstep_jax.models.unet import UNET_LIST_NAMES
from fewstep_jax.paths import Path
from fewstep_jax.teachers.neural import data_shape_of

WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"  # diffusers' config (diffusers layout only)
META_NAME = "fewstep.json"  # this project's metadata
FORMAT_VERSION = 2  # 1: the metadata was config.json's "fewstep" block
PREDICTIONS = ("flow", "x0", "eps", "v")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_HERE = os.path.dirname(os.path.abspath(__file__))
_COPIED = ("torch_models.py", "torch_sampler.py")


# ---- params <-> state dict ----------------------------------------------------------------------
def param_shapes(model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> dict[tuple, tuple]:
    """{Flax param path: shape} of the network `model_cfg` builds (no compile, no allocation)."""
    model = build_model(model_cfg)
    x = jax.ShapeDtypeStruct((1, *data_shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,)))["params"]
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(shapes).items()}


def check_params(params: Any, model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> None:
    """ValueError naming the first missing / unexpected / mis-shaped param."""
    want = param_shapes(model_cfg, data_shape)
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(_strip(params)).items()}
    missing = sorted("/".join(p) for p in set(want) - set(got))
    extra = sorted("/".join(p) for p in set(got) - set(want))
    if missing or extra:
        raise ValueError(f"params do not match the model config: missing {missing}, unexpected {extra}")
    for p, shape in want.items():
        if got[p] != shape:
            raise ValueError(f"shape mismatch at {'/'.join(p)!r}: params {got[p]} vs config {shape}")


def to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax params of any fewstep network -> {torch key: float32 array in torch layout}."""
    return to_diffusers_state_dict(_strip(params))


def from_state_dict(
    state: dict[str, Any], model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...]
) -> dict[str, Any]:
    """Inverse of `to_state_dict`: {torch key: array} -> Flax params (float32) of `model_cfg`.

    A key the config needs but the state lacks, a key it does not know, or a tensor of another
    shape is a ValueError naming the key.
    """
    return params_from_torch(state, param_shapes(model_cfg, data_shape), UNET_LIST_NAMES)


def is_diffusers_compatible(model_cfg: ml_collections.ConfigDict) -> bool:
    """A UNet taking only t (and optionally a class label) is a plain diffusers UNet2DModel."""
    extra = ("use_s", "use_guidance", "num_step_classes")
    return model_cfg.get("name") == "unet" and not any(model_cfg.get(k, 0) for k in extra)


# ---- export -------------------------------------------------------------------------------------
def export_params(
    params: Any,
    model_cfg: ml_collections.ConfigDict,
    out_dir: str,
    *,
    dtype: str = "float32",
    meta: dict[str, Any],
    overwrite: bool = False,
) -> str:
    """Write the exported folder `out_dir` (see module docstring); returns its fewstep.json path.

    meta: "path" (a fewstep_jax Path or {"name": ..., **params}) and "prediction" ("flow" | "x0"
    | "eps" | "v") are required; "method", "student_form" ("euler" | "semilinear"), "uses_s",
    "sampler" ({"grid": [...], "gamma": float, ...}), "time_offset" (network time = t *
    time_scale + time_offset) and any other JSON-serialisable key are stored as given.
    An existing `out_dir` is a FileExistsError unless overwrite=True.
    """
    save_file = require("safetensors.numpy", "writing an export folder").save_file

    if dtype not in DTYPES:
        raise UserError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"export folder {out_dir!r} already exists; pass overwrite=True to replace it")
    fewstep = _fewstep_section(meta)
    data_shape = data_shape_of(model_cfg, params)
    check_params(params, model_cfg, data_shape)

    diffusers_layout = is_diffusers_compatible(model_cfg)
    weights = DIFFUSERS_WEIGHTS_NAME if diffusers_layout else WEIGHTS_NAME
    input_shape = data_shape if len(data_shape) == 1 else (data_shape[2], data_shape[0], data_shape[1])
    fewstep.update(
        architecture=model_cfg.name,
        model=_jsonable(model_cfg.to_dict()),
        data_shape=list(data_shape),
        input_shape=list(input_shape),
        weights=weights,
        dtype=dtype,
        diffusers_layout=diffusers_layout,
    )
    # ml_dtypes rounds to bfloat16 to nearest even, as torch's `.to(torch.bfloat16)` does
    tensors = {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in to_state_dict(params).items()}

    os.makedirs(out_dir, exist_ok=True)
    for stale in (WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, CONFIG_NAME):  # a previous export's other layout
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    save_file(tensors, os.path.join(out_dir, weights), metadata={"format": "pt"})
    if diffusers_layout:
        _write_json(os.path.join(out_dir, CONFIG_NAME), diffusers_folder_config(model_cfg))
    meta_path = os.path.join(out_dir, META_NAME)
    _write_json(meta_path, fewstep)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(fewstep))
    for name in _COPIED:
        shutil.copyfile(os.path.join(_HERE, name), os.path.join(out_dir, name))
    return meta_path


def diffusers_folder_config(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json of the diffusers layout: `_class_name`, `_diffusers_version` (the installed
    diffusers'; omitted without one) and UNet2DModel's kwargs, no other key."""
    config: dict[str, Any] = {"_class_name": "UNet2DModel"}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        config["_diffusers_version"] = importlib.metadata.version("diffusers")
    config.update(_jsonable(diffusers_config(model_cfg)))
    return config


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _fewstep_section(meta: dict[str, Any]) -> dict[str, Any]:
    for key in ("path", "prediction"):
        if key not in meta:
            raise ValueError(f"export meta needs {key!r} (got keys {sorted(meta)})")
    out = {k: _jsonable(v) for k, v in meta.items() if k != "path"}
    out["path"] = path_dict(meta["path"])
    if out["prediction"] not in PREDICTIONS:
        raise ValueError(f"meta prediction must be one of {PREDICTIONS}, got {out['prediction']!r}")
    out.setdefault("student_form", "euler")
    if out["student_form"] not in ("euler", "semilinear"):
        raise ValueError(f"meta student_form must be 'euler' or 'semilinear', got {out['student_form']!r}")
    out.setdefault("uses_s", False)
    out.setdefault("time_offset", 0.0)
    out.setdefault("method", None)
    out.setdefault("sampler", None)
    out["format"] = "fewstep_jax"
    out["format_version"] = FORMAT_VERSION
    return out


def path_dict(path: Path | dict[str, Any]) -> dict[str, Any]:
    """{"name": ..., **params} of a path (what torch_sampler.Path(**d) takes)."""
    if isinstance(path, dict):
        if "name" not in path:
            raise ValueError(f"meta path dict needs a 'name', got {path}")
        return _jsonable(path)
    if dataclasses.is_dataclass(path):
        return _jsonable(dataclasses.asdict(path))
    raise ValueError(f"meta path must be a fewstep_jax Path or a dict, got {type(path).__name__}")


def _readme(f: dict[str, Any]) -> str:
    layout = ""
    if f["diffusers_layout"]:
        layout = (
            "\nThe weights also load as a diffusers `UNet2DModel` (NCHW); its `timestep` argument is\n"
            f"`t * {f['model'].get('time_scale', 1000.0)} + {f['time_offset']}`:\n\n"
            "```python\nfrom diffusers import UNet2DModel\nunet = UNet2DModel.from_pretrained(folder)\n```\n"
        )
    return f"""# fewstep-jax export: {f["architecture"]} ({f.get("method") or "network"})

Path `{f["path"]["name"]}`, prediction `{f["prediction"]}`, student form `{f["student_form"]}`,
time t in [0, 1] (t = 1 noise, t = 0 data), recommended sampler: `{json.dumps(f["sampler"])}`.
Needs torch and safetensors (the UNet also needs diffusers); no JAX.

```python
import sys, torch
folder = "path/to/this/folder"
sys.path.insert(0, folder)
from torch_models import load_exported
from torch_sampler import sample_exported

model, cfg = load_exported(folder)  # cfg: this folder's fewstep.json
samples = sample_exported(model, cfg, torch.randn(16, *cfg["input_shape"]))  # grid/gamma overridable
out = model(torch.randn(4, *cfg["input_shape"]), torch.full((4,), 0.5))   # the raw network
```
{layout}"""


def _strip(params: Any) -> Any:
    params = params.unfreeze() if hasattr(params, "unfreeze") else params
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.ndarray, jax.Array)):
        return np.asarray(v).tolist()
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"export meta value {v!r} of type {type(v).__name__} is not JSON-serialisable")


__all__ = [
    "CONFIG_NAME",
    "DIFFUSERS_WEIGHTS_NAME",
    "META_NAME",
    "WEIGHTS_NAME",
    "check_params",
    "data_shape_of",
    "diffusers_folder_config",
    "export_params",
    "from_state_dict",
    "is_diffusers_compatible",
    "param_shapes",
    "path_dict",
    "to_state_dict",
]
