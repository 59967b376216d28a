"""UNet2DCondition: a Flax Linen twin of diffusers' `UNet2DConditionModel` (NHWC) as SD 1.5,
SD 2.1 and SDXL configure it, params named like its keys.

Architecture (diffusers 0.42 `unets/unet_2d_condition.py`, `unet_2d_blocks.py`):
  emb = time_embedding(sin(timestep), timestep_cond) [+ class_embedding] [+ add_embedding(
        [text_embeds, sin(time_ids)])]  (then SiLU if time_embedding_act_fn)
  conv_in -> down_blocks (DownBlock2D / CrossAttnDownBlock2D: resnet [+ Transformer2DModel] per
  layer, stride-2 conv on all but the last) -> mid_block (UNetMidBlock2DCrossAttn: resnet,
  transformer, resnet) -> up_blocks (UpBlock2D / CrossAttnUpBlock2D, layers + 1 resnets each
  taking [h, skip], skips popped last-in first-out, nearest x2 + conv on all but the last)
  -> conv_norm_out -> SiLU -> conv_out.
Transformer blocks: `models.attention.Transformer2DModel` with heads = attention_head_dim[i]
(diffusers' naming quirk: with num_attention_heads=None, which diffusers requires, the
`attention_head_dim` value is the number of heads) and head width channels // heads.

Param paths map 1:1 onto diffusers keys by `state_dict.torch_key` with `UNET_COND_LIST_NAMES`:
`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_out_0/kernel` <->
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight`.

Use: `module, params = load_unet_condition("sdxl/unet")`, then
`module.apply({"params": params}, latents_nhwc, timestep, text_states, added_cond={...})`.
H and W must be divisible by 2 ** (len(block_out_channels) - 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.models.attention import TRANSFORMER_LIST_NAMES, Transformer2DModel
from fewstep_jax.models.embeddings import DTYPES, Dtype, TimestepEmbedding, compute_dtype, timestep_embedding
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.layers import DownsampleConv, ResnetBlock2D, UpsampleConv, conv, group_norm
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch, torch_key

Array = jax.Array

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
CLASS_EMBED_TYPES = (None, "timestep", "projection")
ADDITION_EMBED_TYPES = (None, "text_time")
TIME_EMBED_ACTS = (None, "silu", "swish")
UNET_COND_LIST_NAMES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    *TRANSFORMER_LIST_NAMES,
)

# config.json options this twin implements, with diffusers' defaults
DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
}
# options implemented only at diffusers' default (SD 1.5 / 2.1 / SDXL use these values)
FIXED: dict[str, Any] = {
    "only_cross_attention": False,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# options that change nothing for the blocks above (they configure block types not implemented)
IGNORED = ("mid_block_only_cross_attention", "addition_embed_type_num_heads")


def _tuple(value: Any) -> Any:
    """Nested lists -> nested tuples (hashable module attributes)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _per_block(value: Any, n: int, field: str) -> tuple:
    """An int (or None) for every block, or a per-block sequence of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DCondition: {field} {tuple(value)} must have {n} entries (one per block)")
        return tuple(value)
    return (value,) * n


def _per_layer(value: Any, n: int, field: str) -> tuple[int, ...]:
    """transformer layers of each of a block's n layers: an int, or a sequence of n ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"UNet2DCondition: {field} entry {tuple(value)} must have {n} entries (one per layer)"
            )
        return tuple(int(v) for v in value)
    return (int(value),) * n


class DownBlock(nn.Module):
    """DownBlock2D / CrossAttnDownBlock2D (transformer_layers not None); returns (h, skips)."""

    out_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...] | None
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    add_downsample: bool
    downsample_padding: int
    groups: int
    eps: float
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, temb: Array, context: Array, mask: Array | None, train: bool
    ) -> tuple[Array, list[Array]]:
        res_cls, tr_cls = _block_classes(self.remat)
        skips = []
        for i in range(self.num_layers):
            x = res_cls(
                self.out_channels, self.groups, self.eps, self.dropout, self.dtype, name=f"resnets_{i}"
            )(x, temb, train)
            if self.transformer_layers is not None:
                x = _transformer(self, tr_cls, self.transformer_layers[i], f"attentions_{i}")(
                    x, context, mask, train
                )
            skips.append(x)
        if self.add_downsample:
            x = DownsampleConv(self.out_channels, self.dtype, self.downsample_padding, name="downsamplers_0")(
                x
            )
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / CrossAttnUpBlock2D: resnet i takes concat([h, skips[-1 - i]], channels)."""

    out_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...] | None
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    add_upsample: bool
    groups: int
    eps: float
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, skips: Sequence[Array], temb: Array, context: Array, mask: Array | None, train: bool
    ) -> Array:
        res_cls, tr_cls = _block_classes(self.remat)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = res_cls(
                self.out_channels, self.groups, self.eps, self.dropout, self.dtype, name=f"resnets_{i}"
            )(x, temb, train)
            if self.transformer_layers is not None:
                x = _transformer(self, tr_cls, self.transformer_layers[i], f"attentions_{i}")(
                    x, context, mask, train
                )
        if self.add_upsample:
            x = UpsampleConv(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn with one layer: resnet, transformer, resnet."""

    out_channels: int
    transformer_layers: tuple[int, ...]
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    groups: int
    eps: float
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, context: Array, mask: Array | None, train: bool) -> Array:
        res_cls, tr_cls = _block_classes(self.remat)
        res = lambda i: res_cls(
            self.out_channels, self.groups, self.eps, self.dropout, self.dtype, name=f"resnets_{i}"
        )
        x = res(0)(x, temb, train)
        x = _transformer(self, tr_cls, self.transformer_layers[0], "attentions_0")(x, context, mask, train)
        return res(1)(x, temb, train)


def _block_classes(remat: bool) -> tuple[type[nn.Module], type[nn.Module]]:
    """ResnetBlock2D and Transformer2DModel, rematerialised when `remat` (train is static)."""
    if not remat:
        return ResnetBlock2D, Transformer2DModel
    return nn.remat(ResnetBlock2D, static_argnums=(3,)), nn.remat(Transformer2DModel, static_argnums=(4,))


def _transformer(block: Any, cls: type[nn.Module], num_layers: int, name: str) -> nn.Module:
    """The Transformer2DModel a cross-attention block builds (heads from the config, width c // heads)."""
    return cls(
        block.heads,
        block.out_channels // block.heads,
        num_layers=num_layers,
        norm_num_groups=block.groups,
        cross_attention_dim=block.cross_attention_dim,
        use_linear_projection=block.use_linear_projection,
        upcast_attention=block.upcast_attention,
        dtype=block.dtype,
        name=name,
    )


class UNet2DCondition(nn.Module):
    """diffusers-compatible UNet2DConditionModel, NHWC (B, H, W, in_channels) -> (B, H, W, out_channels).

    Fields are diffusers' config options (see `DEFAULTS`; lists as tuples), plus `dtype` (the
    compute dtype, "float32" | "bfloat16"; params stay float32) and `remat` (rematerialise each
    resnet and transformer block in the backward pass).
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Sequence[str] = DEFAULTS["down_block_types"]
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = DEFAULTS["up_block_types"]
    block_out_channels: Sequence[int] = DEFAULTS["block_out_channels"]
    layers_per_block: Any = 2
    downsample_padding: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    attention_head_dim: Any = 8
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        validate_unet_condition(self)
        super().__post_init__()

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timestep: Array,
        encoder_hidden_states: Array,
        added_cond: Mapping[str, Array] | None = None,
        timestep_cond: Array | None = None,
        class_labels: Array | None = None,
        encoder_attention_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        """sample (B, H, W, in_channels); timestep scalar or (B,) in diffusers' units (0..999);
        encoder_hidden_states (B, L, cross_attention_dim); added_cond {"text_embeds": (B, P),
        "time_ids": (B, K)} for addition_embed_type="text_time"; timestep_cond (B,
        time_cond_proj_dim) (the LCM/TCD guidance embedding; skipped when None, as diffusers
        does); class_labels (B,) ints / (B,) timesteps / (B, projection dim) by class_embed_type;
        encoder_attention_mask (B, L) with 1 = attend. -> (B, H, W, out_channels) float32."""
        chans = tuple(self.block_out_channels)
        n = len(chans)
        factor = 2 ** (n - 1)
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet2DCondition expects sample of shape (B, H, W, {self.in_channels}), got {sample.shape}"
            )
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(
                f"UNet2DCondition: spatial size {sample.shape[1:3]} must be divisible by {factor} "
                "(2 ** (len(block_out_channels) - 1))"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must have shape ({sample.shape[0]}, L, D), "
                f"got {encoder_hidden_states.shape}"
            )
        dtype = compute_dtype(self.dtype)
        b = sample.shape[0]
        emb = self._embedding(
            b, timestep, encoder_hidden_states, added_cond, timestep_cond, class_labels, dtype
        )

        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        cross = _per_block(self.cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(_tuple(self.transformer_layers_per_block), n, "transformer_layers_per_block")
        rev_tlayers = (
            tlayers[::-1]
            if self.reverse_transformer_layers_per_block is None
            else _per_block(
                _tuple(self.reverse_transformer_layers_per_block), n, "reverse_transformer_layers_per_block"
            )
        )
        common = {
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": bool(self.upcast_attention),
            "groups": self.norm_num_groups,
            "eps": self.norm_eps,
            "dropout": self.dropout,
            "remat": self.remat,
            "dtype": dtype,
        }
        context = encoder_hidden_states.astype(dtype)
        mask = encoder_attention_mask

        x = sample.astype(dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        h = conv(chans[0], dtype, "conv_in", kernel=self.conv_in_kernel)(x)
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            h, block_skips = DownBlock(
                chans[i],
                layers[i],
                _per_layer(tlayers[i], layers[i], "transformer_layers_per_block") if attn else None,
                heads[i],
                cross[i],
                add_downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )(h, emb, context, mask, train)
            skips.extend(block_skips)

        if self.mid_block_type is not None:
            mid_layers = tlayers[-1] if isinstance(tlayers[-1], tuple) else (tlayers[-1],)
            h = MidBlock(chans[-1], mid_layers, heads[-1], cross[-1], name="mid_block", **common)(
                h, emb, context, mask, train
            )

        rev_chans, rev_heads, rev_cross, rev_layers = chans[::-1], heads[::-1], cross[::-1], layers[::-1]
        for i, kind in enumerate(self.up_block_types):
            n_up = rev_layers[i] + 1
            block_skips, skips = skips[-n_up:], skips[:-n_up]
            attn = kind == "CrossAttnUpBlock2D"
            h = UpBlock(
                rev_chans[i],
                n_up,
                _per_layer(rev_tlayers[i], n_up, "reverse_transformer_layers_per_block") if attn else None,
                rev_heads[i],
                rev_cross[i],
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
                **common,
            )(h, block_skips, emb, context, mask, train)

        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, dtype, "conv_norm_out")(h))
        h = conv(self.out_channels, dtype, "conv_out", kernel=self.conv_out_kernel)(h)
        return h.astype(jnp.float32)

    def _embedding(
        self,
        b: int,
        timestep: Array,
        encoder_hidden_states: Array,
        added_cond: Mapping[str, Array] | None,
        timestep_cond: Array | None,
        class_labels: Array | None,
        dtype: Dtype,
    ) -> Array:
        """The (B, time_embed_dim) embedding the resnets take; params at the top level."""
        ted, freq_dim = self.time_embed_dim, self.block_out_channels[0]
        sinus = lambda t, dim: timestep_embedding(t, dim, self.flip_sin_to_cos, self.freq_shift)
        t = jnp.asarray(timestep, jnp.float32)
        t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"timestep must be a scalar or have shape ({b},), got {t.shape}")
        if timestep_cond is not None:
            if self.time_cond_proj_dim is None:
                raise ValueError("got timestep_cond but the UNet config has time_cond_proj_dim=None")
            if timestep_cond.shape != (b, self.time_cond_proj_dim):
                raise ValueError(
                    f"timestep_cond must have shape ({b}, {self.time_cond_proj_dim}), "
                    f"got {timestep_cond.shape}"
                )
            timestep_cond = timestep_cond.astype(dtype)
        emb = TimestepEmbedding(ted, dtype=dtype, name="time_embedding")(
            sinus(t, freq_dim).astype(dtype), timestep_cond
        )

        has_class = self.class_embed_type is not None or self.num_class_embeds is not None
        if class_labels is not None and not has_class:
            raise ValueError("got class_labels but the UNet config has no class embedding")
        if has_class:
            if class_labels is None:
                raise ValueError("class_labels are required: the UNet config has a class embedding")
            if self.class_embed_type is None:
                class_emb = nn.Embed(
                    self.num_class_embeds, ted, dtype=dtype, param_dtype=jnp.float32, name="class_embedding"
                )(jnp.asarray(class_labels, jnp.int32))
            else:
                labels = jnp.asarray(class_labels)
                if self.class_embed_type == "timestep":
                    labels = sinus(labels.astype(jnp.float32).reshape(-1), freq_dim)
                class_emb = TimestepEmbedding(ted, dtype=dtype, name="class_embedding")(labels.astype(dtype))
            emb = emb + class_emb

        if self.addition_embed_type == "text_time":
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError(
                    'addition_embed_type="text_time" needs added_cond='
                    '{"text_embeds": (B, P), "time_ids": (B, K)}'
                )
            text, ids = (
                jnp.asarray(added_cond["text_embeds"]),
                jnp.asarray(added_cond["time_ids"], jnp.float32),
            )
            time_embeds = sinus(ids.reshape(-1), self.addition_time_embed_dim).reshape(b, -1)
            add = jnp.concatenate([text.astype(jnp.float32), time_embeds], axis=-1)
            if add.shape[-1] != self.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"text_embeds width {text.shape[-1]} + {ids.shape[-1]} time ids x "
                    f"{self.addition_time_embed_dim} = {add.shape[-1]} != "
                    f"projection_class_embeddings_input_dim {self.projection_class_embeddings_input_dim}"
                )
            emb = emb + TimestepEmbedding(ted, dtype=dtype, name="add_embedding")(add.astype(dtype))
        elif added_cond:
            raise ValueError("got added_cond but the UNet config has addition_embed_type=None")

        if self.time_embedding_act_fn is not None:
            emb = nn.silu(emb)
        return emb


def validate_unet_condition(m: Any) -> None:
    """ValueError naming the field when a config cannot build a valid network."""
    chans = tuple(m.block_out_channels)
    n = len(chans)
    if len(m.down_block_types) != n or len(m.up_block_types) != n:
        raise ValueError(
            f"UNet2DCondition: down_block_types {tuple(m.down_block_types)} and up_block_types "
            f"{tuple(m.up_block_types)} must both have len(block_out_channels)={n} entries"
        )
    for field, kinds, allowed in (
        ("down_block_types", m.down_block_types, DOWN_BLOCK_TYPES),
        ("up_block_types", m.up_block_types, UP_BLOCK_TYPES),
        ("mid_block_type", (m.mid_block_type,), MID_BLOCK_TYPES),
        ("class_embed_type", (m.class_embed_type,), CLASS_EMBED_TYPES),
        ("addition_embed_type", (m.addition_embed_type,), ADDITION_EMBED_TYPES),
        ("time_embedding_act_fn", (m.time_embedding_act_fn,), TIME_EMBED_ACTS),
    ):
        for kind in kinds:
            if kind not in allowed:
                raise ValueError(
                    f"UNet2DCondition: {field} entry {kind!r} is not implemented (known: {allowed})"
                )
    heads = _per_block(m.attention_head_dim, n, "attention_head_dim")
    _per_block(m.cross_attention_dim, n, "cross_attention_dim")
    _per_block(m.layers_per_block, n, "layers_per_block")
    tl = _per_block(_tuple(m.transformer_layers_per_block), n, "transformer_layers_per_block")
    if m.reverse_transformer_layers_per_block is None and any(isinstance(v, tuple) for v in tl):
        raise ValueError(
            "UNet2DCondition: per-layer transformer_layers_per_block needs "
            "reverse_transformer_layers_per_block"
        )
    for c in chans:
        if c % m.norm_num_groups:
            raise ValueError(f"UNet2DCondition: norm_num_groups={m.norm_num_groups} must divide {chans}")
    attn_chans = [(c, h) for c, h, k in zip(chans, heads, m.down_block_types) if k.startswith("CrossAttn")]
    attn_chans += [
        (c, h) for c, h, k in zip(chans[::-1], heads[::-1], m.up_block_types) if k.startswith("CrossAttn")
    ]
    if m.mid_block_type is not None:
        attn_chans.append((chans[-1], heads[-1]))
    for c, h in attn_chans:
        if c % h:
            raise ValueError(
                f"UNet2DCondition: attention_head_dim={h} (the number of heads) must divide the channels "
                f"({c}) of its cross-attention block"
            )
    if m.class_embed_type is None and m.num_class_embeds is not None and m.num_class_embeds <= 0:
        raise ValueError(f"UNet2DCondition: num_class_embeds={m.num_class_embeds} must be positive")
    if m.class_embed_type == "projection" and m.projection_class_embeddings_input_dim is None:
        raise ValueError(
            'UNet2DCondition: class_embed_type="projection" needs projection_class_embeddings_input_dim'
        )
    if m.addition_embed_type == "text_time" and (
        m.addition_time_embed_dim is None or m.projection_class_embeddings_input_dim is None
    ):
        raise ValueError(
            'UNet2DCondition: addition_embed_type="text_time" needs addition_time_embed_dim and '
            "projection_class_embeddings_input_dim"
        )
    for field in ("conv_in_kernel", "conv_out_kernel"):
        if getattr(m, field) % 2 == 0:
            raise ValueError(f"UNet2DCondition: {field}={getattr(m, field)} must be odd")
    compute_dtype(m.dtype)


# ---- config and weights ----------------------------------------------------------------------
def unet_condition_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    remat: bool = False,
    what: str = "unet/config.json (UNet2DConditionModel)",
) -> UNet2DCondition:
    """The module a diffusers `unet/config.json` describes; an unknown option, or an option at a
    value this twin does not implement, is a UserError naming it."""
    config = dict(config)
    # an all-False per-block list is the default
    oca = config.get("only_cross_attention")
    if isinstance(oca, (list, tuple)) and not any(oca):
        config["only_cross_attention"] = False
    opts = read_options(config, DEFAULTS, what=what, fixed=FIXED, ignored=IGNORED)
    opts = {k: _tuple(v) for k, v in opts.items()}
    try:
        return UNet2DCondition(**opts, dtype=_dtype_name(dtype), remat=remat)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"UNet compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def example_inputs(module: UNet2DCondition, batch: int = 1, seq_len: int = 1) -> dict[str, Any]:
    """Smallest inputs that create every param of `module` (for init / eval_shape)."""
    factor = 2 ** (len(module.block_out_channels) - 1)
    cross = _per_block(module.cross_attention_dim, len(module.block_out_channels), "cross_attention_dim")[0]
    inputs: dict[str, Any] = {
        "sample": jnp.zeros((batch, factor, factor, module.in_channels)),
        "timestep": jnp.zeros((batch,)),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, cross)),
    }
    if module.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = jnp.zeros((batch, module.time_cond_proj_dim))
    if module.class_embed_type == "projection":
        inputs["class_labels"] = jnp.zeros((batch, module.projection_class_embeddings_input_dim))
    elif module.class_embed_type == "timestep":
        inputs["class_labels"] = jnp.zeros((batch,))
    elif module.num_class_embeds is not None:
        inputs["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if module.addition_embed_type == "text_time":
        # the add_embedding input width is all that matters: one time id, the rest text
        text_dim = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
        inputs["added_cond"] = {
            "text_embeds": jnp.zeros((batch, text_dim)),
            "time_ids": jnp.zeros((batch, 1)),
        }
    return inputs


def param_shapes(module: UNet2DCondition) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), **example_inputs(module)))


def load_unet_condition(
    folder: str, dtype: Any = "float32", *, variant: str | None = None, remat: bool = False
) -> tuple[UNet2DCondition, dict[str, Any]]:
    """(module, params) of a diffusers `unet/` folder (config.json + safetensors weights).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype.
    A missing / unexpected key or a mis-shaped tensor is a UserError naming the key.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    module = unet_condition_from_config(
        read_json(config_path), dtype=dtype, remat=remat, what=f"{config_path} (UNet2DConditionModel)"
    )
    state = load_component_weights(folder, variant)
    params = params_from_torch(
        state, param_shapes(module), UNET_COND_LIST_NAMES, what=weights_file(folder, variant)
    )
    return module, params


def diffusers_key(path: Sequence[str]) -> str:
    """Flax param path (no leading "params") -> diffusers UNet2DConditionModel key."""
    return torch_key(path, UNET_COND_LIST_NAMES)


def to_diffusers_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax UNet2DCondition params -> {diffusers key: float32 numpy array in torch layout}."""
    return params_to_torch(params, UNET_COND_LIST_NAMES)
