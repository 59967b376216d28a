"""Flax params <-> PyTorch state dicts, by one naming rule for every diffusers/transformers twin.

Rule: a Flax path `a/b_3/c/kernel` is the torch key `a.b.3.c.weight`. Path parts are joined by
"."; a part `<list>_<i>` whose prefix is one of the model's ModuleList names (`list_names`)
becomes `<list>.<i>`; the leaf `kernel` / `scale` / `embedding` becomes `weight`, `bias` stays.
Layout: Dense kernel (in, out) <-> weight (out, in); Conv kernel HWIO <-> OIHW.
Example: `down_blocks_0/resnets_0/conv1/kernel` <-> `down_blocks.0.resnets.0.conv1.weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fewstep_jax.errors import UserError

_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: Sequence[str], list_names: Collection[str]) -> str:
    """Flax param path (no leading "params") -> torch state-dict key."""
    parts = []
    for part in path[:-1]:
        prefix, _, idx = part.rpartition("_")
        parts.append(f"{prefix}.{idx}" if prefix in list_names and idx.isdigit() else part)
    parts.append(_LEAVES.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_torch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T  # (in, out) -> (out, in)
    return arr


def _to_flax_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def params_to_torch(params: Any, list_names: Collection[str]) -> dict[str, np.ndarray]:
    """Flax params -> {torch key: float32 numpy array in torch layout} (writable, contiguous)."""
    flat = traverse_util.flatten_dict(params.get("params", params))
    out = {}
    for path, value in flat.items():
        arr = np.array(value, np.float32)  # a writable copy (torch.from_numpy needs one)
        out[torch_key(path, list_names)] = np.ascontiguousarray(_to_torch_layout(path[-1], arr))
    return out


def abstract_param_shapes(init: Callable[[], Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of the "params" that ``init()`` (a module's ``init`` call with
    its smallest inputs) creates, evaluated abstractly: no compile, no allocation."""
    tree = jax.eval_shape(init)["params"]
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(tree).items()}


def params_from_torch(
    state: Mapping[str, Any],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    list_names: Collection[str],
    *,
    what: str = "state dict",
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """{torch key: array} -> Flax params with the paths and (Flax-layout) shapes of `shapes`.

    shapes: {Flax path: shape}, e.g. from :func:`abstract_param_shapes`. A key the model needs
    but `state` lacks, a key it does not know, or a tensor of another shape is a UserError (the
    weights do not fit their config) naming the keys and `what` (e.g.
    "unet/diffusion_pytorch_model.safetensors").
    """
    by_key = {torch_key(p, list_names): p for p in shapes}
    missing = sorted(set(by_key) - set(state))
    unexpected = sorted(set(state) - set(by_key))
    if missing or unexpected:
        raise UserError(
            f"{what} does not match the model config: missing keys {missing}, unexpected keys {unexpected}"
        )
    flat = {}
    for key, path in by_key.items():
        arr = _to_flax_layout(path[-1], np.asarray(state[key], np.float32))
        if tuple(arr.shape) != tuple(shapes[path]):
            raise UserError(
                f"shape mismatch at {key!r} in {what}: {tuple(np.shape(state[key]))} does not give "
                f"the config's {tuple(shapes[path])} (Flax layout)"
            )
        flat[path] = jnp.asarray(np.ascontiguousarray(arr), dtype)
    return traverse_util.unflatten_dict(flat)
