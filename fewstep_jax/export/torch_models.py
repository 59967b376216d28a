"""PyTorch mirrors of the fewstep-jax networks (plain torch; the UNet borrows diffusers' blocks).

This file imports torch only (never JAX/Flax), so it can be copied next to an exported folder:

    from torch_models import load_exported
    model, cfg = load_exported("exported/")            # eval mode, weights loaded
    out = model(x, t)                                   # t in [0, 1] (t = 0 data, t = 1 noise)

Networks and inputs mirror `fewstep_jax.models` exactly:
    model(x, t, s=None, label=None, guidance=None, num_steps=None) -> tensor of x.shape
with x (B, D) for "mlp" and NCHW (B, C, H, W) for "unet" (the JAX twin is NHWC), t scalar or
(B,) in [0, 1], label int (B,) with -1 the null (unconditional) class.

State-dict keys are those the exporter writes: the Flax path joined by ".", with diffusers'
ModuleList names (down_blocks_0 -> down_blocks.0) and kernel/scale/embedding -> weight. A UNet
without student branches therefore has exactly the keys of diffusers' `UNet2DModel`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

META_NAME = "fewstep.json"  # the export's metadata (fewstep_jax.export.convert)
CONFIG_NAME = "config.json"  # format_version 1 kept the metadata in config.json["fewstep"]


# ---- embeddings (formulas of diffusers / LCM, as in fewstep_jax.models.embeddings) -----------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers get_timestep_embedding (flip_sin_to_cos=True, shift 0): (B,) -> (B, dim) fp32."""
    t = t.to(torch.float32)
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nnf.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance embedding: [sin, cos] of w * 1000, (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    args = (w.to(torch.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return nnf.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 with an optional bias-free cond_proj added to the input."""

    def __init__(self, in_dim: int, features: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, features)
        self.linear_2 = nn.Linear(features, features)

    def forward(self, sample: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            sample = sample + self.cond_proj(cond)
        return self.linear_2(nnf.silu(self.linear_1(sample)))


def _per_sample(value: Any, batch: int, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    arr = torch.as_tensor(value, dtype=dtype, device=device)
    if arr.ndim == 0:
        return arr.expand(batch)
    if tuple(arr.shape) != (batch,):
        raise ValueError(f"{what} must be a scalar or have shape ({batch},), got {tuple(arr.shape)}")
    return arr


class _Conditioned(nn.Module):
    """Builds the conditioning vector of `fewstep_jax.models.embeddings.conditioning_embedding`."""

    def _build_embeddings(self, c: dict[str, Any], freq_dim: int, embed_dim: int) -> None:
        self.time_scale = float(c.get("time_scale", 1000.0))
        self.freq_dim = freq_dim
        self.num_classes = int(c.get("num_classes", 0))
        self.use_s = bool(c.get("use_s", False))
        self.use_guidance = bool(c.get("use_guidance", False))
        self.guidance_embed_dim = int(c.get("guidance_embed_dim", 256))
        self.num_step_classes = int(c.get("num_step_classes", 0))
        cond_dim = self.guidance_embed_dim if self.use_guidance else None
        self.time_embedding = TimestepEmbedding(freq_dim, embed_dim, cond_dim)
        if self.use_s:
            self.s_embedding = TimestepEmbedding(freq_dim, embed_dim)
        if self.num_classes > 0:
            self.class_embedding = nn.Embedding(self.num_classes + 1, embed_dim)
        if self.num_step_classes > 0:
            self.num_steps_embedding = nn.Embedding(self.num_step_classes, embed_dim)

    def embed(self, x, t, s, label, guidance, num_steps) -> torch.Tensor:
        for value, ok, field in [
            (s, self.use_s, "use_s=False"),
            (label, self.num_classes > 0, "num_classes=0"),
            (guidance, self.use_guidance, "use_guidance=False"),
            (num_steps, self.num_step_classes > 0, "num_step_classes=0"),
        ]:
            if value is not None and not ok:
                raise ValueError(f"got an input for a branch the model config lacks ({field})")
        b, dev = x.shape[0], x.device
        dtype = self.time_embedding.linear_1.weight.dtype
        t = _per_sample(t, b, torch.float32, dev, "t")
        cond = None
        if self.use_guidance:
            w = _per_sample(0.0 if guidance is None else guidance, b, torch.float32, dev, "guidance")
            cond = guidance_scale_embedding(w, self.guidance_embed_dim).to(dtype)
        emb = self.time_embedding(timestep_embedding(t * self.time_scale, self.freq_dim).to(dtype), cond)
        if self.use_s:
            s = t if s is None else _per_sample(s, b, torch.float32, dev, "s")
            emb = emb + self.s_embedding(timestep_embedding(s * self.time_scale, self.freq_dim).to(dtype))
        if self.num_classes > 0:
            lab = _per_sample(-1 if label is None else label, b, torch.long, dev, "label")
            lab = torch.where(lab < 0, torch.full_like(lab, self.num_classes), lab)
            emb = emb + self.class_embedding(lab)
        if self.num_step_classes > 0:
            idx = _per_sample(0 if num_steps is None else num_steps, b, torch.long, dev, "num_steps")
            emb = emb + self.num_steps_embedding(idx)
        return emb


# ---- MLP -------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """x + dense2(SiLU(LN(dense1(SiLU(LN(x))) + emb_proj(SiLU(emb))))), (B, W)."""

    def __init__(self, width: int, emb_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)  # Flax LayerNorm's default epsilon
        self.dense1 = nn.Linear(width, width)
        self.emb_proj = nn.Linear(emb_dim, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.dense2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.dense1(nnf.silu(self.norm1(x))) + self.emb_proj(nnf.silu(emb))
        return x + self.dense2(nnf.silu(self.norm2(h)))


class MLP(_Conditioned):
    """Mirror of fewstep_jax.models.mlp.MLP: (B, D) -> (B, D). `data_dim` is D."""

    def __init__(self, config: dict[str, Any], data_dim: int):
        super().__init__()
        width, emb_dim = int(config.get("width", 256)), int(config.get("emb_dim", 128))
        self._build_embeddings(config, emb_dim, emb_dim)
        self.input_proj = nn.Linear(data_dim, width)
        self.num_layers = int(config.get("num_layers", 4))
        for i in range(self.num_layers):
            self.add_module(f"blocks_{i}", ResidualBlock(width, emb_dim))
        self.norm_out = nn.LayerNorm(width, eps=1e-6)
        self.output_proj = nn.Linear(width, data_dim)

    def forward(self, x, t, s=None, label=None, guidance=None, num_steps=None) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"MLP expects x of shape (B, D), got {tuple(x.shape)}")
        dtype = self.input_proj.weight.dtype
        emb = self.embed(x, t, s, label, guidance, num_steps)
        h = self.input_proj(x.to(dtype))
        for i in range(self.num_layers):
            h = getattr(self, f"blocks_{i}")(h, emb)
        return self.output_proj(nnf.silu(self.norm_out(h))).to(torch.float32)


# ---- UNet ------------------------------------------------------------------------------------
def diffusers_unet_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """UNet2DModel kwargs of our UNet config (same as fewstep_jax.models.diffusers_config)."""
    num_classes = int(config.get("num_classes", 0))
    return {
        "sample_size": int(config["sample_size"]),
        "in_channels": int(config["in_channels"]),
        "out_channels": int(config["out_channels"]),
        "block_out_channels": tuple(int(c) for c in config["block_out_channels"]),
        "down_block_types": tuple(config["down_block_types"]),
        "up_block_types": tuple(config["up_block_types"]),
        "layers_per_block": int(config["layers_per_block"]),
        "attention_head_dim": int(config["attention_head_dim"]),
        "norm_num_groups": int(config["norm_num_groups"]),
        "norm_eps": float(config["norm_eps"]),
        "dropout": float(config.get("dropout", 0.0)),
        "num_class_embeds": num_classes + 1 if num_classes > 0 else None,
    }


class UNet(_Conditioned):
    """Mirror of fewstep_jax.models.unet.UNet2D, NCHW. Needs diffusers (for its block classes).

    The blocks of a `diffusers.UNet2DModel` are adopted as direct children, so the state-dict
    keys are UNet2DModel's, plus the student branches (s_embedding, num_steps_embedding,
    time_embedding.cond_proj).
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError as err:  # pragma: no cover - diffusers is installed in the project env
            raise ImportError("the UNet mirror needs `diffusers` (pip install diffusers)") from err
        core = UNet2DModel(**diffusers_unet_kwargs(config))
        chans = tuple(int(c) for c in config["block_out_channels"])
        for name in ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"):
            self.add_module(name, getattr(core, name))
        self._build_embeddings(config, chans[0], chans[0] * 4)  # replaces time/class embeddings
        self.in_channels = int(config["in_channels"])
        self.factor = 2 ** (len(chans) - 1)

    def forward(self, x, t, s=None, label=None, guidance=None, num_steps=None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"UNet: spatial size {tuple(x.shape[2:])} must be divisible by {self.factor}")
        emb = self.embed(x, t, s, label, guidance, num_steps)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
        h = self.conv_out(nnf.silu(self.conv_norm_out(h)))
        return h.to(torch.float32)


ARCHITECTURES = {"mlp", "unet"}


def build_model(architecture: str, config: dict[str, Any], data_shape: tuple[int, ...]) -> nn.Module:
    """The mirror of `architecture` ("mlp" | "unet") for a model config; data_shape of one sample."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    if architecture == "mlp":
        return MLP(config, int(data_shape[-1]))
    return UNet(config)


def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Strict load with errors naming the missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"shape mismatch at {key!r}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model.to(dtype)
    model.load_state_dict(state, strict=True)
    return model


def read_config(folder: str) -> dict[str, Any]:
    """The metadata of an exported folder: its fewstep.json, or the "fewstep" block of its
    config.json (folders written before fewstep.json, format_version 1)."""
    path = os.path.join(folder, META_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    legacy = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(legacy):
        with open(legacy) as f:
            cfg = json.load(f)
        if "fewstep" in cfg:
            return cfg["fewstep"]
    raise FileNotFoundError(f"no {META_NAME} in {folder!r}: not a fewstep-jax export folder")


def load_exported(folder: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode with the exported weights, its metadata (`read_config`)) of an exported
    folder."""
    from safetensors.torch import load_file

    cfg = read_config(folder)
    weights = os.path.join(folder, cfg["weights"])
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights!r} named in {META_NAME} is missing")
    model = build_model(cfg["architecture"], cfg["model"], tuple(cfg["data_shape"]))
    load_state_dict(model, load_file(weights, device="cpu"))
    return model.to(device).eval(), cfg
