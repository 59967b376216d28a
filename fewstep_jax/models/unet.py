"""UNet2D: a Flax Linen twin of diffusers' `UNet2DModel` (NHWC), params named like its keys.

Architecture (diffusers 0.42 `unets/unet_2d.py` with time_embedding_type="positional",
flip_sin_to_cos=True, freq_shift=0, resnet_time_scale_shift="default", act_fn="silu",
downsample_padding=1, downsample_type=upsample_type="conv", add_attention=True,
mid_block_scale_factor=1, class_embed_type=None):
conv_in -> down_blocks (DownBlock2D / AttnDownBlock2D, `layers_per_block` resnets each, a
stride-2 conv downsampler on all but the last) -> mid_block (resnet, attention, resnet) ->
up_blocks (UpBlock2D / AttnUpBlock2D, `layers_per_block + 1` resnets, each concatenating
[h, skip] on channels with skips popped last-in first-out, nearest x2 + conv upsampler on all
but the last) -> conv_norm_out -> SiLU -> conv_out. Time embedding dim = block_out_channels[0]*4.

Param-name rule (see `diffusers_key`): a Flax path `a/b_3/c/kernel` becomes the diffusers key
`a.b.3.c.weight`: path parts are joined by "." and a part `<list>_<i>` whose prefix is one of
diffusers' ModuleLists (down_blocks, up_blocks, resnets, attentions, downsamplers, upsamplers,
to_out) becomes `<list>.<i>`; the leaf `kernel`/`scale`/`embedding` becomes `weight`, `bias`
stays. Tensor layout: Dense kernel (in, out) -> weight (out, in); Conv kernel HWIO -> OIHW.
Example: `down_blocks_0/resnets_0/conv1/kernel` <-> `down_blocks.0.resnets.0.conv1.weight`.

Student-only branches (not in UNet2DModel) follow the same rule: `s_embedding.linear_{1,2}`,
`num_steps_embedding.weight`, and `time_embedding.cond_proj.weight` (the guidance input, which
is where diffusers' UNet2DConditionModel puts LCM's `timestep_cond`).

Spatial constraint: H and W must be divisible by 2 ** (len(block_out_channels) - 1), as in
diffusers (an odd size can be the *lowest* resolution: 28 -> 14 -> 7 works with 3 blocks, but 7
itself cannot be downsampled since nearest x2 upsampling would not restore the skip's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax.models.embeddings import Dtype, compute_dtype, conditioning_embedding
from fewstep_jax.models.layers import (
    Attention,
    DownsampleConv,
    MidBlock2D,
    ResnetBlock2D,
    UpsampleConv,
    conv,
    group_norm,
)
from fewstep_jax.models.state_dict import params_to_torch, torch_key

Array = jax.Array

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
UNET_LIST_NAMES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "to_out",
)


def unet_config(preset: str = "mnist") -> ml_collections.ConfigDict:
    """Small UNet defaults: "mnist" (28x28x1, ~1.1M params) or "digits" (8x8x1, ~0.7M)."""
    base = {
        "name": "unet",
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "attention_head_dim": 32,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "dropout": 0.0,
        "time_scale": 1000.0,
        "num_classes": 0,
        "use_s": False,
        "use_guidance": False,
        "guidance_embed_dim": 256,
        "num_step_classes": 0,
        "dtype": "float32",
    }
    if preset == "mnist":
        # 28 -> 14 -> 7; attention only at 7x7 (last down block, first up block, mid block).
        base.update(
            sample_size=28,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
    elif preset == "digits":
        # 8 -> 4; attention at 4x4.
        base.update(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
    else:
        raise ValueError(f"unknown UNet preset {preset!r}; expected 'mnist' or 'digits'")
    return ml_collections.ConfigDict(base)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D; returns (h, skips) with one skip per resnet (+ downsample)."""

    out_channels: int
    num_layers: int
    attention: bool
    add_downsample: bool
    head_dim: int
    groups: int
    eps: float
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> tuple[Array, list[Array]]:
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels,
                self.groups,
                self.eps,
                self.dropout,
                self.dtype,
                name=f"resnets_{i}",
            )(x, temb, train)
            if self.attention:
                x = Attention(self.head_dim, self.groups, self.eps, self.dtype, name=f"attentions_{i}")(x)
            skips.append(x)
        if self.add_downsample:
            # diffusers Downsample2D(name="op") stores its conv as `.conv`.
            x = DownsampleConv(self.out_channels, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: resnet i takes concat([h, skips[-1 - i]], channels)."""

    out_channels: int
    num_layers: int
    attention: bool
    add_upsample: bool
    head_dim: int
    groups: int
    eps: float
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skips: Sequence[Array], temb: Array, train: bool) -> Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock needs {self.num_layers} skips, got {len(skips)}")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(
                self.out_channels,
                self.groups,
                self.eps,
                self.dropout,
                self.dtype,
                name=f"resnets_{i}",
            )(x, temb, train)
            if self.attention:
                x = Attention(self.head_dim, self.groups, self.eps, self.dtype, name=f"attentions_{i}")(x)
        if self.add_upsample:
            x = UpsampleConv(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNet2D(nn.Module):
    """diffusers-compatible UNet, NHWC (B, H, W, in_channels) -> (B, H, W, out_channels).

    Config fields are the attributes; see `unet_config` for defaults and the module docstring
    for the param-name rule and the spatial constraint.
    """

    sample_size: int = 28
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: Sequence[int] = (32, 64, 64)
    down_block_types: Sequence[str] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_scale: float = 1000.0
    num_classes: int = 0
    use_s: bool = False
    use_guidance: bool = False
    guidance_embed_dim: int = 256
    num_step_classes: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        validate_unet(self)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        s: Array | None = None,
        label: Array | None = None,
        guidance: Array | None = None,
        num_steps: Array | None = None,
        train: bool = False,
    ) -> Array:
        """x (B, H, W, C), t scalar or (B,) in [0, 1] -> (B, H, W, out_channels) float32."""
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet2D expects x of shape (B, H, W, {self.in_channels}), got {x.shape}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet2D: spatial size {x.shape[1:3]} must be divisible by {factor} "
                f"(2 ** (len(block_out_channels) - 1))"
            )
        dtype = compute_dtype(self.dtype)
        chans = tuple(self.block_out_channels)
        groups, eps = self.norm_num_groups, self.norm_eps
        temb = conditioning_embedding(
            x.shape[0],
            t,
            s,
            label,
            guidance,
            num_steps,
            freq_dim=chans[0],
            embed_dim=chans[0] * 4,
            time_scale=self.time_scale,
            num_classes=self.num_classes,
            use_s=self.use_s,
            use_guidance=self.use_guidance,
            guidance_embed_dim=self.guidance_embed_dim,
            num_step_classes=self.num_step_classes,
            dtype=dtype,
        )

        h = conv(chans[0], dtype, "conv_in")(x.astype(dtype))
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            h, block_skips = DownBlock(
                chans[i],
                self.layers_per_block,
                kind == "AttnDownBlock2D",
                add_downsample=i < len(chans) - 1,
                head_dim=self.attention_head_dim,
                groups=groups,
                eps=eps,
                dropout=self.dropout,
                dtype=dtype,
                name=f"down_blocks_{i}",
            )(h, temb, train)
            skips.extend(block_skips)

        mid = MidBlock2D(
            chans[-1], self.attention_head_dim, groups, eps, self.dropout, dtype, name="mid_block"
        )
        h = mid(h, temb, train)

        rev = chans[::-1]
        n_up = self.layers_per_block + 1
        for i, kind in enumerate(self.up_block_types):
            block_skips, skips = skips[-n_up:], skips[:-n_up]
            h = UpBlock(
                rev[i],
                self.layers_per_block + 1,
                kind == "AttnUpBlock2D",
                add_upsample=i < len(chans) - 1,
                head_dim=self.attention_head_dim,
                groups=groups,
                eps=eps,
                dropout=self.dropout,
                dtype=dtype,
                name=f"up_blocks_{i}",
            )(h, block_skips, temb, train)

        h = nn.silu(group_norm(groups, eps, dtype, "conv_norm_out")(h))
        h = conv(self.out_channels, dtype, "conv_out")(h)
        return h.astype(jnp.float32)


def validate_unet(m: Any) -> None:
    """ValueError naming the field when a UNet2D config cannot build a valid network."""
    chans = tuple(m.block_out_channels)
    n = len(chans)
    if len(m.down_block_types) != n or len(m.up_block_types) != n:
        raise ValueError(
            f"UNet2D: down_block_types {tuple(m.down_block_types)} and up_block_types "
            f"{tuple(m.up_block_types)} must both have len(block_out_channels)={n} entries"
        )
    for kind in m.down_block_types:
        if kind not in DOWN_BLOCK_TYPES:
            raise ValueError(f"UNet2D: down_block_types entry {kind!r} not in {DOWN_BLOCK_TYPES}")
    for kind in m.up_block_types:
        if kind not in UP_BLOCK_TYPES:
            raise ValueError(f"UNet2D: up_block_types entry {kind!r} not in {UP_BLOCK_TYPES}")
    factor = 2 ** (n - 1)
    if m.sample_size % factor:
        raise ValueError(
            f"UNet2D: sample_size={m.sample_size} cannot be downsampled {n - 1} times "
            f"(must be divisible by {factor} for block_out_channels={chans})"
        )
    for c in chans:
        if c % m.norm_num_groups:
            raise ValueError(
                f"UNet2D: norm_num_groups={m.norm_num_groups} must divide every "
                f"block_out_channels entry {chans}"
            )
    attn_chans = (
        [chans[-1]]
        + [c for c, k in zip(chans, m.down_block_types) if k == "AttnDownBlock2D"]
        + [c for c, k in zip(chans[::-1], m.up_block_types) if k == "AttnUpBlock2D"]
    )
    for c in attn_chans:
        if c % m.attention_head_dim:
            raise ValueError(
                f"UNet2D: attention_head_dim={m.attention_head_dim} must divide the channels "
                f"({c}) of every attention layer"
            )
    compute_dtype(m.dtype)


def diffusers_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `UNet2DModel(**config)` kwargs of the diffusers model our UNet2D config mirrors."""
    return {
        "sample_size": int(cfg.sample_size),
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "block_out_channels": tuple(int(c) for c in cfg.block_out_channels),
        "down_block_types": tuple(cfg.down_block_types),
        "up_block_types": tuple(cfg.up_block_types),
        "layers_per_block": int(cfg.layers_per_block),
        "attention_head_dim": int(cfg.attention_head_dim),
        "norm_num_groups": int(cfg.norm_num_groups),
        "norm_eps": float(cfg.norm_eps),
        "dropout": float(cfg.get("dropout", 0.0)),
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "downsample_padding": 1,
        "add_attention": True,
        # Our table has a null row at index num_classes (label -1).
        "num_class_embeds": int(cfg.num_classes) + 1 if cfg.get("num_classes", 0) > 0 else None,
    }


def diffusers_key(path: Sequence[str]) -> str:
    """Flax param path (tuple of names, no leading "params") -> diffusers state-dict key."""
    return torch_key(path, UNET_LIST_NAMES)


def to_diffusers_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax UNet2D params -> {diffusers key: float32 numpy array in torch layout}."""
    return params_to_torch(params, UNET_LIST_NAMES)
