"""LoRA adapters on any of the project's Linen models, by config (docs/guides/lora.md).

The mechanism is Google's qwix (``qwix.LoraProvider``): it intercepts the ``dot_general`` (Dense),
``einsum`` (DenseGeneral) and, optionally, ``conv_general_dilated`` (Conv) of every module whose
Flax path fully matches ``LoraSpec.targets`` and adds ``(alpha / rank) * (x @ A) @ B``, with the
params ``<kernel>_lora_a`` / ``<kernel>_lora_b`` beside the layer's kernel:

    Dense   kernel (in, out):          lora_a (in, r),            lora_b (r, out)
    Conv    kernel (kh, kw, in, out):  lora_a (kh, kw, in, r),    lora_b (r, out)   (a kxk conv to r
                                       channels, then a 1x1 conv: peft's Conv2d LoRA)

A LoRA student's params are the adapters alone (float32 whatever the base's dtype); the frozen base
is the teacher's own params, joined with them inside the jitted step (:class:`WithBase`), so one
copy of the base weights lives in memory and only the adapters are differentiated, held by the
optimizer and EMA, and checkpointed.

Paths are Flax module paths joined by "/" (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/
to_q``), the names :mod:`fewstep_jax.models.state_dict` maps to the torch keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fewstep_jax.errors import UserError, did_you_mean, require

Array = jax.Array
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
# the attention projections of the UNets and DiTs (diffusers' usual LoRA targets: to_q, to_k,
# to_v, to_out.0, and the MMDiT / Flux context projections add_{q,k,v}_proj, to_add_out)
ATTENTION = r".*(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
INITS = ("kaiming", "gaussian")
DEFAULTS: dict[str, Any] = {
    "targets": ATTENTION,
    "rank": 4,
    "alpha": 4.0,
    "dropout": 0.0,
    "convs": False,
    "init": "kaiming",
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    targets: regex that must fully match a module's Flax path ("/"-joined) for its layer to get an
      adapter; rank, alpha: the adapter's rank r and scale alpha / r (as peft's ``lora_alpha``);
      dropout: on the adapter's input (training only); convs: also adapt Conv layers;
      init: lora_a's init, "kaiming" (peft's default: uniform with bound 1 / sqrt(fan_in)) or
      "gaussian" (normal with std 1 / r, peft's "gaussian"); lora_b starts at zero, so a fresh
      student is its base exactly.
    """

    targets: str = ATTENTION
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    convs: bool = False
    init: str = "kaiming"

    @property
    def scaling(self) -> float:
        return float(self.alpha) / int(self.rank)


def read_lora_spec(cfg: Any, where: str = "lora") -> LoraSpec:
    """A :class:`LoraSpec` from a config block (ConfigDict, mapping or None: the defaults); an
    unknown key, a rank < 1, alpha <= 0, dropout outside [0, 1), an unknown init or a regex that
    does not compile is a UserError naming ``where.<key>``."""
    given = dict(cfg.items()) if cfg is not None else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        hint = did_you_mean(unknown[0], DEFAULTS)
        raise UserError(f"{where}: unknown keys {unknown}{hint}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **given}
    if int(opts["rank"]) < 1:
        raise UserError(f"{where}.rank must be >= 1, got {opts['rank']!r}")
    if not float(opts["alpha"]) > 0:
        raise UserError(f"{where}.alpha must be > 0, got {opts['alpha']!r}")
    if not 0.0 <= float(opts["dropout"]) < 1.0:
        raise UserError(f"{where}.dropout must be in [0, 1), got {opts['dropout']!r}")
    if opts["init"] not in INITS:
        raise UserError(f"{where}.init must be one of {INITS}, got {opts['init']!r}")
    try:
        re.compile(str(opts["targets"]))
    except re.error as err:
        raise UserError(f"{where}.targets {opts['targets']!r} is not a regular expression: {err}") from None
    return LoraSpec(
        targets=str(opts["targets"]),
        rank=int(opts["rank"]),
        alpha=float(opts["alpha"]),
        dropout=float(opts["dropout"]),
        convs=bool(opts["convs"]),
        init=str(opts["init"]),
    )


def lora_module(module: Any, specs: LoraSpec | tuple[LoraSpec, ...]) -> Any:
    """``module`` (a Linen module) with qwix's LoRA on the layers ``specs`` target; with several
    specs a layer takes the first whose targets match it (imported files of mixed ranks)."""
    qwix = require("qwix", "LoRA students")
    specs = specs if isinstance(specs, tuple) else (specs,)
    ops = ("dot_general", "einsum")
    rules = [
        qwix.LoraRule(
            module_path=s.targets,
            op_names=(*ops, "conv_general_dilated") if s.convs else ops,
            rank=s.rank,
            alpha=s.alpha,
            dropout=s.dropout,
        )
        for s in specs
    ]
    return qwix.apply_lora_to_model(module, qwix.LoraProvider(rules))


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether a flattened param path is a LoRA factor (``.../<kernel>_lora_a`` or ``_lora_b``)."""
    return path[-1].endswith((SUFFIX_A, SUFFIX_B))


def adapter_layers(adapters: Any) -> dict[tuple[str, ...], tuple[Array, Array]]:
    """{(module path..., kernel name): (lora_a, lora_b)} of an adapters tree."""
    flat = traverse_util.flatten_dict(adapters)
    out = {}
    for path, a in flat.items():
        if path[-1].endswith(SUFFIX_A):
            kernel = path[-1][: -len(SUFFIX_A)]
            out[(*path[:-1], kernel)] = (a, flat[(*path[:-1], kernel + SUFFIX_B)])
    return out


def _init_a(init: str, key: Array, shape: tuple[int, ...]) -> Array:
    rank, fan_in = shape[-1], int(np.prod(shape[:-1]))
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / rank
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_adapters(
    module: Any, spec: LoraSpec, inputs: Mapping[str, Any], key: Array, what: str = "model"
) -> Any:
    """Fresh adapters (float32) for ``module`` (the base, not yet wrapped) under ``spec``.

    inputs: keyword inputs that create every param (e.g. ``unet_condition.example_inputs``); the
    base is only traced (``jax.eval_shape``), never allocated. A regex that matches no layer, or a
    rank above a layer's smaller side (a LoRA that cannot be low-rank), is a UserError naming it.
    """
    wrapped = lora_module(module, spec)
    shapes = jax.eval_shape(lambda: wrapped.init(jax.random.PRNGKey(0), **inputs))["params"]
    flat = traverse_util.flatten_dict(shapes)
    wanted = {p: v.shape for p, v in flat.items() if is_adapter(p)}
    if not wanted:
        layers = sorted("/".join(p[:-1]) for p in flat if p[-1] == "kernel")
        raise UserError(
            f"lora.targets {spec.targets!r} matches no layer of the {what} (convs={spec.convs}); "
            f"its layers look like {layers[:3]}"
        )
    out = {}
    for i, (path, shape) in enumerate(sorted(wanted.items())):
        if path[-1].endswith(SUFFIX_A):
            kernel = flat[(*path[:-1], path[-1][: -len(SUFFIX_A)])].shape
            fan_in, fan_out = int(np.prod(kernel[:-1])) if len(kernel) == 4 else kernel[0], kernel[-1]
            if spec.rank > min(fan_in, fan_out):
                raise UserError(
                    f"lora.rank {spec.rank} is larger than layer {'/'.join(path[:-1])} "
                    f"({fan_in} -> {fan_out}): pick a rank <= {min(fan_in, fan_out)} or narrow lora.targets"
                )
            out[path] = _init_a(spec.init, jax.random.fold_in(key, i), tuple(shape))
        else:
            out[path] = jnp.zeros(shape, jnp.float32)
    return traverse_util.unflatten_dict(out)


def split(params: Any) -> tuple[Any, Any]:
    """(base, adapters) of a params tree holding both."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not is_adapter(p)}
    adapters = {p: v for p, v in flat.items() if is_adapter(p)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base: Any, adapters: Any) -> Any:
    """The params tree of the wrapped module: the base's leaves and the adapters' (no copy)."""
    flat = traverse_util.flatten_dict(base)
    for path, value in traverse_util.flatten_dict(adapters).items():
        if (*path[:-1], path[-1][: -len(SUFFIX_A)]) not in flat:
            raise UserError(f"adapter {'/'.join(path)} has no layer in the base model")
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def scaled(adapters: Any, scale: float | Array) -> Any:
    """Adapters whose update is ``scale`` times this one (diffusers' ``set_adapters`` weight):
    lora_b times ``scale`` (the update is linear in it)."""
    flat = traverse_util.flatten_dict(adapters)
    return traverse_util.unflatten_dict(
        {p: v * scale if p[-1].endswith(SUFFIX_B) else v for p, v in flat.items()}
    )


def layer_delta(a: Array, b: Array) -> Array:
    """A @ B in the layer's kernel layout: Dense (in, r) @ (r, out) -> (in, out); Conv
    (kh, kw, in, r) with (r, out) -> (kh, kw, in, out)."""
    return jnp.einsum("...r,ro->...o", a.astype(jnp.float32), b.astype(jnp.float32))


def spec_of(path: str, specs: LoraSpec | Sequence[LoraSpec]) -> LoraSpec:
    """The spec whose targets match the module path ``path`` first (as lora_module's rules)."""
    for spec in (specs,) if isinstance(specs, LoraSpec) else specs:
        if re.fullmatch(spec.targets, path):
            return spec
    raise UserError(f"adapter {path} matches none of the LoRA specs' targets")


def merged(base: Any, adapters: Any, specs: LoraSpec | Sequence[LoraSpec], scale: float = 1.0) -> Any:
    """The base with the adapters folded in: kernel + scale * (alpha / r) * A @ B, in the kernel's
    dtype (``specs``: the adapters' spec, or a LoraFile's per-group specs). Stacking a second LoRA
    (a style LoRA) is merging it first, then training or sampling the next on the merged base."""
    flat = traverse_util.flatten_dict(base)
    for path, (a, b) in adapter_layers(adapters).items():
        where = "/".join(path[:-1])
        if path not in flat:
            raise UserError(f"adapter {where} has no layer in the base model")
        w = flat[path]
        delta = layer_delta(a, b)
        if delta.shape != w.shape:
            raise UserError(f"adapter {where}: A @ B is {delta.shape}, the kernel {w.shape}")
        factor = scale * spec_of(where, specs).scaling
        flat[path] = (w.astype(jnp.float32) + factor * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


@flax.struct.dataclass
class WithBase:
    """A LoRA network's params as its apply takes them: its adapters and the frozen base (the
    teacher's params, the same arrays)."""

    adapters: Any
    base: Any

    def full(self) -> Any:
        return combine(self.base, self.adapters)


__all__ = [
    "ATTENTION",
    "DEFAULTS",
    "LoraSpec",
    "WithBase",
    "adapter_layers",
    "combine",
    "init_adapters",
    "is_adapter",
    "layer_delta",
    "lora_module",
    "merged",
    "read_lora_spec",
    "scaled",
    "spec_of",
    "split",
]
