"""AutoencoderKL: a Flax Linen twin of diffusers' `AutoencoderKL` (NHWC), params named like its keys.

Architecture (diffusers 0.42 `autoencoders/autoencoder_kl.py`, `autoencoders/vae.py`, and the
DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D of `unets/unet_2d_blocks.py`), every norm
GroupNorm(norm_num_groups, eps=1e-6), every activation SiLU, no time embedding:
  encoder: conv_in -> down_blocks (`layers_per_block` resnets, then a stride-2 padding-0 conv,
    which pads right/bottom by one, on all but the last) -> mid_block (resnet, single-head
    attention if `mid_block_add_attention`, resnet) -> conv_norm_out -> SiLU -> conv_out
    (2 * latent_channels: mean and log-variance);
  quant_conv (1x1, if `use_quant_conv`) -> DiagonalGaussian(mean, logvar clamped to [-30, 20]);
  post_quant_conv (1x1, if `use_post_quant_conv`) -> decoder: conv_in -> mid_block -> up_blocks
    (reversed channels, `layers_per_block + 1` resnets, nearest x2 + conv on all but the last) ->
    conv_norm_out -> SiLU -> conv_out.

Latents as the pipelines use them: `to_latents(vae, z) = (z - shift_factor) * scaling_factor`
(shift_factor None means 0: SD 1.5 / SDXL; SD3 / Flux set it), `from_latents` its inverse.

Param-name rule (`models.state_dict`, list names `VAE_LIST_NAMES`): the Flax path
`encoder/down_blocks_0/resnets_0/norm1/scale` is the diffusers key
`encoder.down_blocks.0.resnets.0.norm1.weight`; `encoder/mid_block/attentions_0/to_out_0/kernel`
is `encoder.mid_block.attentions.0.to_out.0.weight`.

Tiling (diffusers' `enable_tiling`) is an argument of `encode` / `decode` (`Tiling`): tiles of
`sample_min_size` pixels (`latent_min_size` latents) overlapping by `overlap_factor`, each blended
linearly into its already-blended upper and left neighbours, then cropped; used only when the
input exceeds the tile size, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.models.embeddings import Dtype, compute_dtype
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.layers import (
    DownsampleConv,
    MidBlock2D,
    ResnetBlock2D,
    UpsampleConv,
    conv,
    group_norm,
)
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch
from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

Array = jax.Array

VAE_EPS = 1e-6  # diffusers hard-codes it in Encoder / Decoder (not a config option)
VAE_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp

# diffusers AutoencoderKL.__init__ defaults; `dtype` (compute) is this project's own.
VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,  # kept for pipelines that read them; the model itself never does
    "latents_std": None,
    "force_upcast": True,  # a pipeline's dtype advice; compute dtype is the `dtype` option here
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
VAE_FIXED = {"act_fn": "silu"}


def _mid_block(channels: int, parent: Any) -> MidBlock2D:
    """The VAE's UNetMidBlock2D: no time embedding, single-head attention (head_dim = channels)."""
    return MidBlock2D(
        channels,
        channels,
        parent.groups,
        VAE_EPS,
        dtype=parent.dtype,
        add_attention=parent.mid_attention,
        name="mid_block",
    )


class DownEncoderBlock(nn.Module):
    """DownEncoderBlock2D: `num_layers` resnets, then the padding-0 stride-2 conv if `add_downsample`."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(
                x, None, False
            )
        if self.add_downsample:
            x = DownsampleConv(self.out_channels, self.dtype, padding=0, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """UpDecoderBlock2D: `num_layers` resnets, then nearest x2 + conv if `add_upsample`."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(
                x, None, False
            )
        if self.add_upsample:
            x = UpsampleConv(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers vae.Encoder(double_z=True): (B, H, W, in) -> (B, H/f, W/f, 2 * latent_channels)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chans = tuple(self.block_out_channels)
        h = conv(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))
        for i, c in enumerate(chans):
            h = DownEncoderBlock(
                c, self.layers_per_block, self.groups, i < len(chans) - 1, self.dtype, name=f"down_blocks_{i}"
            )(h)
        h = _mid_block(chans[-1], self)(h, None, False)
        h = nn.silu(group_norm(self.groups, VAE_EPS, self.dtype, "conv_norm_out")(h))
        return conv(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """diffusers vae.Decoder (norm_type="group"): (B, h, w, latent_channels) -> (B, h*f, w*f, out)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        rev = tuple(self.block_out_channels)[::-1]
        h = conv(rev[0], self.dtype, "conv_in")(z.astype(self.dtype))
        h = _mid_block(rev[0], self)(h, None, False)
        for i, c in enumerate(rev):
            h = UpDecoderBlock(
                c, self.layers_per_block + 1, self.groups, i < len(rev) - 1, self.dtype, name=f"up_blocks_{i}"
            )(h)
        h = nn.silu(group_norm(self.groups, VAE_EPS, self.dtype, "conv_norm_out")(h))
        return conv(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL; attributes are its config.json options (see `VAE_DEFAULTS`) plus
    the compute `dtype` ("float32" | "bfloat16"; params stay float32, outputs are float32).

    Methods (through `apply(..., method=...)`, or the pure functions below): `moments` x (B, H, W,
    in_channels) -> (B, h, w, 2 * latent_channels) [mean | logvar], unclamped; `decode_z` z (B, h,
    w, latent_channels) -> (B, h*f, w*f, out_channels); `init_all` runs both (for `init`).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | Sequence[int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        validate_vae(self)
        super().__post_init__()

    def setup(self) -> None:
        dtype = compute_dtype(self.dtype)
        chans = tuple(self.block_out_channels)
        common = dict(layers_per_block=self.layers_per_block, groups=self.norm_num_groups, dtype=dtype)
        attn = self.mid_block_add_attention
        self.encoder = Encoder(chans, latent_channels=self.latent_channels, mid_attention=attn, **common)
        self.decoder = Decoder(chans, out_channels=self.out_channels, mid_attention=attn, **common)
        one_by_one = lambda c: nn.Conv(c, (1, 1), padding="VALID", dtype=dtype, param_dtype=jnp.float32)
        if self.use_quant_conv:
            self.quant_conv = one_by_one(2 * self.latent_channels)
        if self.use_post_quant_conv:
            self.post_quant_conv = one_by_one(self.latent_channels)

    def moments(self, x: Array) -> Array:
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        return h.astype(jnp.float32)

    def decode_z(self, z: Array) -> Array:
        z = z.astype(compute_dtype(self.dtype))
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def init_all(self, x: Array) -> tuple[Array, Array]:
        h = self.moments(x)
        return h, self.decode_z(h[..., : self.latent_channels])


def validate_vae(m: Any) -> None:
    """UserError naming the option when an AutoencoderKL config cannot build this network."""
    chans = tuple(m.block_out_channels)
    n = len(chans)
    if n == 0 or len(m.down_block_types) != n or len(m.up_block_types) != n:
        raise UserError(
            f"AutoencoderKL: down_block_types {tuple(m.down_block_types)} and up_block_types "
            f"{tuple(m.up_block_types)} must both have len(block_out_channels)={n} entries"
        )
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in getattr(m, key) if t != kind]
        if bad:
            raise UserError(f"AutoencoderKL: {key} entries {bad} are not supported (only {kind!r})")
    for c in chans:
        if c % m.norm_num_groups:
            raise UserError(
                f"AutoencoderKL: norm_num_groups={m.norm_num_groups} must divide every block_out_channels "
                f"entry {chans}"
            )
    if m.layers_per_block < 1:
        raise UserError(f"AutoencoderKL: layers_per_block={m.layers_per_block} must be >= 1")
    compute_dtype(m.dtype)


def vae_from_config(
    config: Mapping[str, Any], *, what: str = "vae/config.json", dtype: str = "float32"
) -> AutoencoderKL:
    """An `AutoencoderKL` from a diffusers config dict; an unknown option, or act_fn other than
    "silu", is a UserError naming it and `what`."""
    opts = read_options(config, VAE_DEFAULTS, what=f"{what} (AutoencoderKL)", fixed=VAE_FIXED)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}  # hashable attributes
    return AutoencoderKL(**opts, dtype=dtype)


def param_shapes(vae: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of the model (abstract init, no compute)."""
    side = downsample_factor(vae)  # the smallest image every block can take
    x = jnp.zeros((1, side, side, vae.in_channels), jnp.float32)
    return abstract_param_shapes(lambda: vae.init(jax.random.PRNGKey(0), x, method=AutoencoderKL.init_all))


def load_vae(folder: str, dtype: str = "float32", variant: str | None = None) -> tuple[AutoencoderKL, Any]:
    """(module, params) of a diffusers `vae/` folder (config.json + safetensors weights).

    dtype: compute dtype ("float32" | "bfloat16"); params are float32 either way. A missing,
    unexpected or mis-shaped key is a UserError naming it and the weights file.
    """
    config_path = os.path.join(folder, "config.json")
    vae = vae_from_config(read_json(config_path), what=config_path, dtype=dtype)
    path = weights_file(folder, variant)
    state = load_component_weights(folder, variant)
    params = params_from_torch(state, param_shapes(vae), VAE_LIST_NAMES, what=path)
    return vae, {"params": params}


def to_diffusers_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax AutoencoderKL params -> {diffusers key: float32 numpy array in torch layout}."""
    return params_to_torch(params, VAE_LIST_NAMES)


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(vae.block_out_channels) - 1)


def latent_shape(vae: AutoencoderKL, image_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(B, H, W, in_channels) image shape -> (B, h, w, latent_channels) of `encode` (untiled).

    Each padding-0 downsampler maps a side n to n // 2 (it pads by one, then a 3x3 stride-2 conv).
    """
    b, hgt, wid, c = image_shape
    if c != vae.in_channels:
        raise UserError(f"AutoencoderKL: image has {c} channels, the VAE takes in_channels={vae.in_channels}")
    for _ in range(len(vae.block_out_channels) - 1):
        hgt, wid = hgt // 2, wid // 2
    return (b, hgt, wid, vae.latent_channels)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """diffusers' tiled encode / decode: tiles of `sample_min_size` pixels / `latent_min_size`
    latents, consecutive tiles `overlap_factor` of a tile apart less than a full tile."""

    sample_min_size: int
    latent_min_size: int
    overlap_factor: float = 0.25


def default_tiling(vae: AutoencoderKL, sample_min_size: int | None = None) -> Tiling:
    """diffusers' `enable_tiling()` sizes: the config's sample_size (its first entry if a list)
    and that over the downsampling factor; `sample_min_size` overrides both consistently."""
    size = vae.sample_size[0] if isinstance(vae.sample_size, (list, tuple)) else vae.sample_size
    size = int(size if sample_min_size is None else sample_min_size)
    return Tiling(size, int(size / downsample_factor(vae)))


def encode(vae: AutoencoderKL, params: Any, x: Array, tiling: Tiling | None = None) -> tuple[Array, Array]:
    """x (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, h, w, latent_channels)
    float32, logvar clamped to [-30, 20] as DiagonalGaussianDistribution does."""
    moments = lambda t: vae.apply(params, t, method=AutoencoderKL.moments)
    if tiling is not None and max(x.shape[1], x.shape[2]) > tiling.sample_min_size:
        h = _tiled(
            moments,
            x,
            tile=tiling.sample_min_size,
            stride=int(tiling.sample_min_size * (1 - tiling.overlap_factor)),
            blend=int(tiling.latent_min_size * tiling.overlap_factor),
            keep=tiling.latent_min_size - int(tiling.latent_min_size * tiling.overlap_factor),
        )
    else:
        h = moments(x)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def decode(vae: AutoencoderKL, params: Any, z: Array, tiling: Tiling | None = None) -> Array:
    """z (B, h, w, latent_channels), the VAE's own (unscaled) latents, e.g. `from_latents(...)`
    -> image (B, h*f, w*f, out_channels) float32, nominally in [-1, 1] (not clipped)."""
    dec = lambda t: vae.apply(params, t, method=AutoencoderKL.decode_z)
    if tiling is not None and max(z.shape[1], z.shape[2]) > tiling.latent_min_size:
        return _tiled(
            dec,
            z,
            tile=tiling.latent_min_size,
            stride=int(tiling.latent_min_size * (1 - tiling.overlap_factor)),
            blend=int(tiling.sample_min_size * tiling.overlap_factor),
            keep=tiling.sample_min_size - int(tiling.sample_min_size * tiling.overlap_factor),
        )
    return dec(z)


def _tiled(fn: Any, x: Array, *, tile: int, stride: int, blend: int, keep: int) -> Array:
    """diffusers' tiling loop, NHWC: fn on each tile x[:, i:i+tile, j:j+tile] (i, j multiples of
    `stride`; edge tiles smaller), each output blended over `blend` rows/columns into the
    already-blended tile above and to its left, then cropped to `keep` x `keep`."""
    if stride < 1:
        raise UserError(f"VAE tiling: tile size {tile} with this overlap gives a stride of {stride} < 1")
    rows: list[list[Array]] = []
    for i in range(0, x.shape[1], stride):
        row = []
        for j in range(0, x.shape[2], stride):
            t = fn(x[:, i : i + tile, j : j + tile])
            if rows:
                t = _blend(rows[-1][len(row)], t, blend, axis=1)
            if row:
                t = _blend(row[-1], t, blend, axis=2)
            row.append(t)
        rows.append(row)
    return jnp.concatenate(
        [jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1
    )


def _blend(a: Array, b: Array, extent: int, axis: int) -> Array:
    """b with its first `extent` rows (axis 1) or columns (axis 2) mixed from a's last ones:
    b[y] <- a[y - extent] * (1 - y / extent) + b[y] * (y / extent) (diffusers blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    b_rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([a_tail * (1 - w) + b_head * w, b_rest], axis=axis)


def latents_from_moments(mean: Array, logvar: Array, rng: Array | None = None) -> Array:
    """z: the posterior's mode (rng None) or a sample mean + exp(logvar / 2) * N(0, 1) (rng)."""
    if rng is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def to_latents(vae: AutoencoderKL, z: Array) -> Array:
    """VAE latents -> the diffusion model's: (z - shift_factor) * scaling_factor."""
    return (z - (vae.shift_factor or 0.0)) * vae.scaling_factor


def from_latents(vae: AutoencoderKL, latents: Array) -> Array:
    """The diffusion model's latents -> VAE latents for `decode`: latents / scaling_factor + shift."""
    return latents / vae.scaling_factor + (vae.shift_factor or 0.0)
