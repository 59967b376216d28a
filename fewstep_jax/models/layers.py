"""Building blocks shared by the diffusers-twin networks (UNet2D, UNet2DCondition, AutoencoderKL).

NHWC throughout; params named as diffusers names the submodules, so `models.state_dict` maps
them 1:1 to the PyTorch keys. Compute in `dtype`, params float32, softmax in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.models.embeddings import Dtype

Array = jax.Array


def conv(
    features: int, dtype: Dtype, name: str, kernel: int = 3, stride: int = 1, pad: int | None = None
) -> nn.Conv:
    """torch Conv2d(kernel, stride, padding=pad (default kernel // 2)) as an NHWC Flax conv."""
    # Explicit symmetric padding: torch's padding=1 with stride 2 differs from Flax "SAME".
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm="default", output_scale_factor=1), NHWC.

    temb (B, E) adds a `time_emb_proj` of it after conv1; temb=None is the VAE's block
    (temb_channels=None: no projection).
    """

    out_channels: int
    groups: int
    eps: float
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, self.dtype, "conv1")(h)
        if temb is not None:
            temb = nn.Dense(
                self.out_channels, dtype=self.dtype, param_dtype=jnp.float32, name="time_emb_proj"
            )(nn.silu(temb))
            h = h + temb[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1)(x)
        return x + h


class Attention(nn.Module):
    """diffusers Attention as built by its UNet2D / VAE blocks (group_norm, to_q/k/v, to_out.0,
    residual connection, softmax in float32), over the H*W positions of NHWC input.
    head_dim = channels gives the VAE's single-head attention."""

    head_dim: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        if c % self.head_dim:
            raise ValueError(f"attention_head_dim={self.head_dim} must divide channels {c}")
        heads = c // self.head_dim
        h = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        split = lambda a: a.reshape(b, hgt * wid, heads, self.head_dim)
        q, k, v = split(dense("to_q")(h)), split(dense("to_k")(h)), split(dense("to_v")(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(self.head_dim)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, c)
        out = dense("to_out_0")(out).reshape(b, hgt, wid, c)
        return out + x


class MidBlock2D(nn.Module):
    """diffusers UNetMidBlock2D with one layer: resnet, attention (unless `add_attention` is off,
    the VAE's `mid_block_add_attention=False`), resnet. temb=None: no time projection (the VAE)."""

    channels: int
    head_dim: int
    groups: int
    eps: float
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    add_attention: bool = True

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
        res = lambda i: ResnetBlock2D(
            self.channels, self.groups, self.eps, self.dropout, self.dtype, name=f"resnets_{i}"
        )
        x = res(0)(x, temb, train)
        if self.add_attention:
            x = Attention(self.head_dim, self.groups, self.eps, self.dtype, name="attentions_0")(x)
        return res(1)(x, temb, train)


class DownsampleConv(nn.Module):
    """diffusers Downsample2D(use_conv=True): 3x3 conv, stride 2, padding 1; padding=0 is the
    VAE encoder's (it pads right and bottom by one before the unpadded conv)."""

    channels: int
    dtype: Dtype = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, self.dtype, "conv", stride=2, pad=self.padding)(x)


class UpsampleConv(nn.Module):
    """diffusers Upsample2D(use_conv=True): nearest-neighbour x2, then 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, self.dtype, "conv")(x)
