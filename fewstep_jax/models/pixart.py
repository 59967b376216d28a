"""PixArtTransformer2D: a Flax Linen twin of diffusers' `PixArtTransformer2DModel` (PixArt-alpha,
PixArt-Sigma), NHWC, params named like its keys.

Architecture (diffusers 0.42 `transformers/pixart_transformer_2d.py`, `normalization.
AdaLayerNormSingle`, `embeddings.PixArtAlphaCombinedTimestepSizeEmbeddings` /
`PixArtAlphaTextProjection` / `PatchEmbed`), D = num_attention_heads * attention_head_dim:
  tokens = pos_embed(x)        patch conv + 2D sin-cos table of the input's patch grid
                               (base_size = sample_size // patch_size, interpolation_scale)
  emb    = adaln_single.emb:   timestep_embedder(sin(t), 256 freqs, cos first, shift 0)
                               [+ concat(resolution_embedder(sin(h), sin(w)),
                                         aspect_ratio_embedder(sin(ar)))]  (D // 3 each)
  temb   = adaln_single.linear(silu(emb))            (B, 6 D), shared by every block
  ctx    = caption_projection(T5 states)             linear_1 -> gelu(tanh) -> linear_2
  blocks: BasicTransformerBlock(norm_type="ada_norm_single") x num_layers (models/attention.py)
  out    = proj_out(norm_out(h) * (1 + scale) + shift), (shift, scale) = scale_shift_table + emb
  -> unpatchify -> (B, H, W, out_channels).
With learned sigma (out_channels = 2 * in_channels, as the released checkpoints) the full output
is returned; pipelines take the first in_channels channels as the noise prediction, as
diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline do.

Defaults diffusers decides from the config: use_additional_conditions None -> sample_size == 128
(PixArt-alpha 1024 uses the resolution / aspect-ratio embeddings; 512, 256 and Sigma configs set
or default it off), interpolation_scale None -> max(sample_size // 64, 1), out_channels None ->
in_channels.

Param paths map 1:1 onto diffusers keys by `state_dict.torch_key` with `PIXART_LIST_NAMES`:
`transformer_blocks_0/attn2/to_out_0/kernel` <-> `transformer_blocks.0.attn2.to_out.0.weight`,
`adaln_single/emb/timestep_embedder/linear_1/kernel` <-> the same dotted key.

Use: `module, params = load_pixart_transformer("PixArt-Sigma/transformer")`, then
`module.apply({"params": params}, latents_nhwc, timestep, t5_states, t5_mask, added_cond)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.models.attention import FF_ACTIVATIONS, TRANSFORMER_LIST_NAMES, BasicTransformerBlock
from fewstep_jax.models.embeddings import DTYPES, Dtype, TimestepEmbedding, compute_dtype, timestep_embedding
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.patch_embed import PatchEmbed, unpatchify
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch

Array = jax.Array

PIXART_LIST_NAMES = TRANSFORMER_LIST_NAMES
# the sinusoidal width of the timestep / size embeddings (diffusers' Timesteps(256, True, 0))
FREQ_DIM = 256

# config.json options this twin implements, with diffusers' defaults
DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "upcast_attention": False,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,
    "use_additional_conditions": None,
    "caption_channels": None,
}
# options implemented only at one value (every PixArt checkpoint has these; the older
# `Transformer2DModel` configs of PixArt-alpha also carry the last three)
FIXED: dict[str, Any] = {
    "norm_type": "ada_norm_single",
    "attention_type": "default",
    "dropout": 0.0,
    "double_self_attention": False,
    "only_cross_attention": False,
    "num_vector_embeds": None,
}
# options that do not change the computation of a PixArt transformer
IGNORED = ("norm_num_groups", "num_embeds_ada_norm", "use_linear_projection")


class PixArtTransformer2D(nn.Module):
    """diffusers-compatible PixArtTransformer2DModel, NHWC (B, H, W, in_channels) -> (B, H, W,
    out_channels).

    Fields are diffusers' config options (see `DEFAULTS`), plus `dtype` (the compute dtype,
    "float32" | "bfloat16"; params stay float32) and `remat` (rematerialise each transformer
    block in the backward pass).
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    cross_attention_dim: int | None = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    upcast_attention: bool = False
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        validate_pixart(self)
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def additional_conditions(self) -> bool:
        """diffusers' rule: None means on exactly for sample_size 128 (PixArt-alpha 1024)."""
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)

    @property
    def pos_interpolation_scale(self) -> float:
        if self.interpolation_scale is None:
            return max(self.sample_size // 64, 1)
        return self.interpolation_scale

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timestep: Array,
        encoder_hidden_states: Array,
        encoder_attention_mask: Array | None = None,
        added_cond: Mapping[str, Array | None] | None = None,
        train: bool = False,
    ) -> Array:
        """sample (B, H, W, in_channels) latents, H and W divisible by patch_size (any size: the
        positional table is recomputed for it); timestep scalar or (B,) in diffusers' units
        (0..1000); encoder_hidden_states (B, L, caption_channels) T5 states (cross_attention_dim
        wide when caption_channels is None); encoder_attention_mask (B, L), 1 = attend;
        added_cond {"resolution": (B, 2) (height, width) in pixels, "aspect_ratio": (B, 1)}, needed
        with additional conditions (None values are accepted, and ignored, without them).
        -> (B, H, W, out_channels) float32 (learned sigma: channels [in_channels:] are the variance).
        """
        dtype = compute_dtype(self.dtype)
        d, p = self.inner_dim, self.patch_size
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"PixArtTransformer2D expects sample of shape (B, H, W, {self.in_channels}), "
                f"got {sample.shape}"
            )
        b, hgt, wid, _ = sample.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states must have shape ({b}, L, D), got {encoder_hidden_states.shape}"
            )
        if encoder_attention_mask is not None and encoder_attention_mask.shape != (
            b,
            encoder_hidden_states.shape[1],
        ):
            raise ValueError(
                f"encoder_attention_mask must have shape {encoder_hidden_states.shape[:2]} (1 = attend), "
                f"got {encoder_attention_mask.shape}"
            )
        tokens = PatchEmbed(
            height=self.sample_size,
            width=self.sample_size,
            patch_size=p,
            embed_dim=d,
            interpolation_scale=self.pos_interpolation_scale,
            dtype=dtype,
            name="pos_embed",
        )(sample)

        temb, emb = AdaLayerNormSingle(d, self.additional_conditions, dtype, name="adaln_single")(
            timestep, added_cond, b
        )

        context = encoder_hidden_states.astype(dtype)
        if self.caption_channels is not None:
            if context.shape[-1] != self.caption_channels:
                raise ValueError(
                    f"encoder_hidden_states width {context.shape[-1]} != caption_channels "
                    f"{self.caption_channels}"
                )
            context = CaptionProjection(d, dtype, name="caption_projection")(context)

        block_cls = (
            nn.remat(BasicTransformerBlock, static_argnums=(4,)) if self.remat else BasicTransformerBlock
        )
        h = tokens
        for i in range(self.num_layers):
            h = block_cls(
                self.num_attention_heads,
                self.attention_head_dim,
                cross_attention_dim=self.cross_attention_dim,
                attention_bias=self.attention_bias,
                upcast_attention=self.upcast_attention,
                norm_eps=self.norm_eps,
                norm_elementwise_affine=self.norm_elementwise_affine,
                activation_fn=self.activation_fn,
                norm_type="ada_norm_single",
                dtype=dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, encoder_attention_mask, train, temb)

        table = self.param("scale_shift_table", nn.initializers.normal(d**-0.5), (2, d), jnp.float32)
        shift, scale = jnp.split((table[None] + emb.astype(jnp.float32)[:, None]).astype(dtype), 2, axis=1)
        h = nn.LayerNorm(
            epsilon=1e-6,
            use_bias=False,
            use_scale=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            name="norm_out",
        )(h)
        h = h * (1 + scale) + shift
        h = nn.Dense(p * p * self.output_channels, dtype=dtype, param_dtype=jnp.float32, name="proj_out")(h)
        return unpatchify(h, (hgt // p, wid // p), p).astype(jnp.float32)


def _per_sample(value: Any, batch: int, what: str) -> Array:
    """A scalar or (B,) value as (B,) float32."""
    arr = jnp.asarray(value, jnp.float32)
    if arr.ndim == 0:
        return jnp.broadcast_to(arr, (batch,))
    if arr.shape != (batch,):
        raise ValueError(f"{what} must be a scalar or have shape ({batch},), got {arr.shape}")
    return arr


class CombinedTimestepSizeEmbeddings(nn.Module):
    """diffusers `PixArtAlphaCombinedTimestepSizeEmbeddings`: (B,) timesteps [+ sizes] -> (B, D).

    With additional conditions: resolution (B, 2) and aspect_ratio (B, 1) each through the same
    256-wide sinusoid and their own TimestepEmbedding to D // 3 per value, concatenated to
    (B, D) (D must be divisible by 3) and added.
    """

    dim: int
    additional_conditions: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: Array, added_cond: Mapping[str, Array | None] | None, batch: int) -> Array:
        sinus = lambda v: timestep_embedding(v, FREQ_DIM, flip_sin_to_cos=True, freq_shift=0).astype(
            self.dtype
        )
        t = _per_sample(timestep, batch, "timestep")
        emb = TimestepEmbedding(self.dim, dtype=self.dtype, name="timestep_embedder")(sinus(t))
        cond = dict(added_cond or {})
        if not self.additional_conditions:
            given = sorted(k for k, v in cond.items() if v is not None)
            if given:
                raise ValueError(
                    f"got added_cond {given} but the PixArt config has no additional conditions "
                    "(use_additional_conditions off)"
                )
            return emb
        shapes = {"resolution": (batch, 2), "aspect_ratio": (batch, 1)}
        parts = []
        for key, shape in shapes.items():
            if cond.get(key) is None:
                raise ValueError(
                    'this PixArt config uses additional conditions: added_cond={"resolution": (B, 2), '
                    f'"aspect_ratio": (B, 1)}} is required (missing {key!r})'
                )
            value = jnp.asarray(cond[key], jnp.float32)
            if value.size != batch * shape[1]:
                raise ValueError(f"added_cond[{key!r}] must have shape {shape}, got {value.shape}")
            size_emb = TimestepEmbedding(self.dim // 3, dtype=self.dtype, name=f"{key}_embedder")(
                sinus(value.reshape(-1))
            )
            parts.append(size_emb.reshape(batch, -1))
        return emb + jnp.concatenate(parts, axis=-1)


class AdaLayerNormSingle(nn.Module):
    """diffusers `AdaLayerNormSingle`: -> (linear(silu(emb)) (B, 6 D), emb (B, D))."""

    dim: int
    additional_conditions: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, timestep: Array, added_cond: Mapping[str, Array | None] | None, batch: int
    ) -> tuple[Array, Array]:
        emb = CombinedTimestepSizeEmbeddings(self.dim, self.additional_conditions, self.dtype, name="emb")(
            timestep, added_cond, batch
        )
        temb = nn.Dense(6 * self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear")(nn.silu(emb))
        return temb, emb


class CaptionProjection(nn.Module):
    """diffusers `PixArtAlphaTextProjection` (act "gelu_tanh"): (B, L, C) -> (B, L, dim)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_2")(h)


def validate_pixart(m: Any) -> None:
    """ValueError naming the field when a config cannot build a valid network."""
    d = m.num_attention_heads * m.attention_head_dim
    if m.activation_fn not in FF_ACTIVATIONS:
        raise ValueError(f"PixArtTransformer2D: activation_fn {m.activation_fn!r} not in {FF_ACTIVATIONS}")
    if d % 4:
        raise ValueError(
            f"PixArtTransformer2D: num_attention_heads * attention_head_dim = {d} must be divisible by 4 "
            "(the 2D sin-cos positional embedding)"
        )
    extra = m.sample_size == 128 if m.use_additional_conditions is None else m.use_additional_conditions
    if extra and d % 3:
        raise ValueError(
            f"PixArtTransformer2D: with additional conditions the width {d} must be divisible by 3 "
            "(resolution and aspect-ratio embeddings of width // 3 each)"
        )
    if m.caption_channels is not None and m.cross_attention_dim != d:
        raise ValueError(
            f"PixArtTransformer2D: cross_attention_dim {m.cross_attention_dim} must equal the width {d} "
            "when caption_channels is set (the caption projection outputs the width)"
        )
    if m.cross_attention_dim is None:
        raise ValueError(
            "PixArtTransformer2D: cross_attention_dim=None (no text conditioning) is not supported"
        )
    compute_dtype(m.dtype)


# ---- config and weights ----------------------------------------------------------------------
def pixart_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    remat: bool = False,
    what: str = "transformer/config.json (PixArtTransformer2DModel)",
) -> PixArtTransformer2D:
    """The module a diffusers `transformer/config.json` describes; an unknown option, or an option
    at a value this twin does not implement, is a UserError naming it and the file."""
    opts = read_options(config, DEFAULTS, what=what, fixed=FIXED, ignored=IGNORED)
    try:
        return PixArtTransformer2D(**opts, dtype=_dtype_name(dtype), remat=remat)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"PixArt compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def example_inputs(module: PixArtTransformer2D, batch: int = 1, seq_len: int = 1) -> dict[str, Any]:
    """Smallest inputs that create every param of `module` (for init / eval_shape)."""
    p = module.patch_size
    width = module.caption_channels if module.caption_channels is not None else module.cross_attention_dim
    inputs: dict[str, Any] = {
        "sample": jnp.zeros((batch, p, p, module.in_channels)),
        "timestep": jnp.zeros((batch,)),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, width)),
    }
    if module.additional_conditions:
        inputs["added_cond"] = {"resolution": jnp.zeros((batch, 2)), "aspect_ratio": jnp.zeros((batch, 1))}
    return inputs


def param_shapes(module: PixArtTransformer2D) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), **example_inputs(module)))


def load_pixart_transformer(
    folder: str, dtype: Any = "float32", *, variant: str | None = None, remat: bool = False
) -> tuple[PixArtTransformer2D, dict[str, Any]]:
    """(module, params) of a diffusers PixArt `transformer/` folder (config.json + safetensors,
    single or sharded, optional fp16/bf16 `variant`).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype. A
    missing / unexpected key or a mis-shaped tensor is a UserError naming the key and file.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    module = pixart_from_config(
        read_json(config_path), dtype=dtype, remat=remat, what=f"{config_path} (PixArtTransformer2DModel)"
    )
    state = load_component_weights(folder, variant)
    params = params_from_torch(
        state, param_shapes(module), PIXART_LIST_NAMES, what=weights_file(folder, variant)
    )
    return module, params


def pixart_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Flax PixArtTransformer2D params -> {diffusers key: float32 numpy array in torch layout}
    (loads into `PixArtTransformer2DModel.load_state_dict(..., strict=True)`)."""
    return params_to_torch(params, PIXART_LIST_NAMES)
