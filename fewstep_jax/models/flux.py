"""FluxTransformer2D: a Flax Linen twin of diffusers' `FluxTransformer2DModel` (FLUX.1-dev with the
guidance embedding, FLUX.1-schnell without), on packed latent tokens, params named like its keys.

Architecture (diffusers 0.42 `transformers/transformer_flux.py`; the attention and adaptive norms
are models/mmdit.py's), D = num_attention_heads * attention_head_dim:
  x      = x_embedder(hidden_states)          Linear in_channels (4 x 16 packed 2x2) -> D
  temb   = time_text_embed(1000 t, [1000 g,] pooled)   timestep_embedder(sin(1000 t))
                                 [+ guidance_embedder(sin(1000 g))] + text_embedder(pooled)
  c      = context_embedder(encoder_hidden_states)     Linear joint_attention_dim -> D
  rope   = (cos, sin) over ids = [txt_ids; img_ids] (FluxPosEmbed: one 1-D rotary table per id
           column, axes_dims_rope wide each, theta 10000, frequencies repeated per (even, odd) pair)
  double blocks (FluxTransformerBlock) x num_layers, per stream AdaLayerNormZero:
        a_x, a_c = attn(norm1(x), norm1_context(c), rope)     joint softmax over [text; image],
                   per-head RMS qk norm (eps 1e-6) on both streams, rope on q and k
        x += g * a_x;  x += g2 * ff(norm2(x) * (1 + s2) + b2)          (and likewise for c)
  single blocks (FluxSingleTransformerBlock) x num_single_layers on h = [c; x]:
        n, g = norm(h, temb)                                  AdaLayerNormZeroSingle (3 chunks)
        h += g * proj_out([attn(n, rope) ; gelu_tanh(proj_mlp(n))])  (attn without to_out)
  out    = proj_out(norm_out(x, temb))                        AdaLayerNormContinuous
  -> (B, N, patch_size^2 * out_channels).
The pipelines pass sigma in 0..1 as timestep (and the guidance scale as guidance); the model
multiplies both by 1000, as diffusers does.

`pack_latents` / `unpack_latents` / `latent_image_ids` are FluxPipeline's `_pack_latents` /
`_unpack_latents` / `_prepare_latent_image_ids` on NHWC latents.

Not supported: diffusers' forward extras `controlnet_block_samples` /
`controlnet_single_block_samples`, IP-adapter image embeddings (`joint_attention_kwargs`), LoRA
scales, fused qkv projections.

Param paths map 1:1 onto diffusers keys by `state_dict.torch_key` with `FLUX_LIST_NAMES`:
`single_transformer_blocks_0/attn/norm_q/scale` <-> `single_transformer_blocks.0.attn.norm_q.weight`.

Use: `module, params = load_flux_transformer("FLUX.1-schnell/transformer")`, then
`module.apply({"params": params}, packed, sigma, t5_states, pooled_clip, img_ids, txt_ids)`.
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
from fewstep_jax.models.attention import FeedForward
from fewstep_jax.models.embeddings import DTYPES, Dtype, TimestepEmbedding, compute_dtype, timestep_embedding
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.mmdit import (
    MMDIT_LIST_NAMES,
    NORM_EPS,
    TIME_FREQ_DIM,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    CombinedTimestepTextProjEmbeddings,
    JointAttention,
    TextProjection,
)
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch

Array = jax.Array
Rotary = tuple[Array, Array]

FLUX_LIST_NAMES = (*MMDIT_LIST_NAMES, "single_transformer_blocks")
# FluxPosEmbed's theta (fixed in diffusers, not a config option)
ROPE_THETA = 10000.0
# the pipelines' timestep / guidance are scaled by this inside the model
TIME_SCALE = 1000.0

# config.json options this twin implements, with diffusers' defaults (every option of
# FluxTransformer2DModel's config is implemented)
DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


# ---- latents and positions ---------------------------------------------------------------------
def pack_latents(latents: Array) -> Array:
    """FluxPipeline._pack_latents on NHWC: (B, H, W, C) -> (B, H/2 * W/2, 4C), token (i, j) row-major,
    feature c * 4 + 2 * dy + dx (channel-major, as the NCHW original)."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height and width must be even, got {(h, w)}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: Array, height: int, width: int) -> Array:
    """Inverse of `pack_latents`: (B, H/2 * W/2, 4C) -> (B, H, W, C) latents (H, W latent sizes, even;
    FluxPipeline._unpack_latents with pixel sizes rounds them to 2 * (pixels // (2 * vae_scale)))."""
    b, n, c4 = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(
            f"unpack_latents: {packed.shape} packed tokens do not make even ({height}, {width}) latents"
        )
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c4 // 4)


def latent_image_ids(h: int, w: int) -> np.ndarray:
    """FluxPipeline._prepare_latent_image_ids for an (h, w) grid of packed tokens (latent size / 2):
    (h * w, 3) float32 rows (0, i, j), row-major."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flux_rotary(ids: Array, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> Rotary:
    """FluxPosEmbed: ids (S, n_axes) -> (cos, sin) (S, sum(axes_dims)) float32.

    Column i gets the 1-D table of width axes_dims[i]: angle pos * theta^(-2k / dim), each angle
    repeated for the (even, odd) pair it rotates. Concrete ids are computed in float64 as diffusers
    does (then cast); traced ids in float32 (angle error ~ pos * 1e-7).
    """
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(f"position ids must have shape (S, {len(axes_dims)}), got {ids.shape}")
    concrete = not isinstance(ids, jax.core.Tracer)
    xp, ftype = (np, np.float64) if concrete else (jnp, jnp.float32)
    pos = xp.asarray(np.asarray(ids, np.float32) if concrete else ids.astype(jnp.float32), ftype)
    angles = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(xp.repeat(pos[:, i : i + 1] * xp.asarray(freqs, ftype)[None], 2, axis=1))
    angle = xp.concatenate(angles, axis=1)
    return jnp.asarray(xp.cos(angle), jnp.float32), jnp.asarray(xp.sin(angle), jnp.float32)


# ---- blocks ------------------------------------------------------------------------------------
def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=NORM_EPS, use_bias=False, use_scale=False, dtype=dtype, param_dtype=jnp.float32
    )


class CombinedTimestepGuidanceTextProjEmbeddings(nn.Module):
    """diffusers `CombinedTimestepGuidanceTextProjEmbeddings` (FLUX.1-dev): timestep, guidance (B,)
    in 0..1000 units, pooled (B, P) -> timestep_embedder(sin(t)) + guidance_embedder(sin(g)) +
    text_embedder(pooled), (B, dim)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: Array, guidance: Array, pooled: Array) -> Array:
        def embed(t: Array, name: str) -> Array:
            freqs = timestep_embedding(t, TIME_FREQ_DIM, flip_sin_to_cos=True, freq_shift=0)
            return TimestepEmbedding(self.dim, dtype=self.dtype, name=name)(freqs.astype(self.dtype))

        emb = embed(timestep, "timestep_embedder") + embed(guidance, "guidance_embedder")
        return emb + TextProjection(self.dim, "silu", self.dtype, name="text_embedder")(pooled)


class AdaLayerNormZeroSingle(nn.Module):
    """diffusers `AdaLayerNormZeroSingle`: x (B, L, D), temb (B, D) -> (norm(x) * (1 + scale) + shift,
    gate (B, 1, D)) with (shift, scale, gate) = linear(silu(temb)); LayerNorm eps 1e-6, no affine."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> tuple[Array, Array]:
        emb = _dense(3 * x.shape[-1], self.dtype, "linear")(nn.silu(temb.astype(self.dtype)))
        shift, scale, gate = jnp.split(emb[:, None, :], 3, axis=-1)
        return _norm(self.dtype)(x) * (1 + scale) + shift, gate


class FluxTransformerBlock(nn.Module):
    """diffusers `FluxTransformerBlock` (double stream): x (B, N, D), context (B, M, D), temb (B, D),
    rotary (cos, sin) (M + N, dim_head) -> (x, context), both (B, ., D)."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, temb: Array, rotary: Rotary) -> tuple[Array, Array]:
        d = self.heads * self.dim_head
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(False, self.dtype, name="norm1")(
            x, temb
        )
        c_h, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
            False, self.dtype, name="norm1_context"
        )(context, temb)
        a, ca = JointAttention(
            self.heads, self.dim_head, d, "rms_norm", dtype=self.dtype, text_first=True, name="attn"
        )(h, c_h, rotary)
        ff = lambda name: FeedForward(dim_out=d, activation="gelu-approximate", dtype=self.dtype, name=name)
        x = x + gate_msa * a
        x = x + gate_mlp * ff("ff")(_norm(self.dtype)(x) * (1 + scale_mlp) + shift_mlp)
        context = context + c_gate_msa * ca
        c_h = _norm(self.dtype)(context) * (1 + c_scale_mlp) + c_shift_mlp
        return x, context + c_gate_mlp * ff("ff_context")(c_h)


class FluxSingleTransformerBlock(nn.Module):
    """diffusers `FluxSingleTransformerBlock` on the joint stream h = [text; image] (B, S, D) (diffusers
    concatenates and splits around every block; the twin keeps h joined between them), temb (B, D),
    rotary (S, dim_head) -> h (B, S, D)."""

    heads: int
    dim_head: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, temb: Array, rotary: Rotary) -> Array:
        d = h.shape[-1]
        n, gate = AdaLayerNormZeroSingle(self.dtype, name="norm")(h, temb)
        mlp = nn.gelu(_dense(int(d * self.mlp_ratio), self.dtype, "proj_mlp")(n), approximate=True)
        attn = JointAttention(
            self.heads, self.dim_head, d, "rms_norm", dtype=self.dtype, pre_only=True, name="attn"
        )(n, None, rotary)
        return h + gate * _dense(d, self.dtype, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))


# ---- the model ---------------------------------------------------------------------------------
class FluxTransformer2D(nn.Module):
    """diffusers-compatible FluxTransformer2DModel on packed tokens (B, N, in_channels) ->
    (B, N, patch_size^2 * out_channels).

    Fields are diffusers' config options (see `DEFAULTS`; axes_dims_rope a tuple), plus `dtype`
    (the compute dtype, "float32" | "bfloat16"; params stay float32) and `remat` (rematerialise
    each block in the backward pass).
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        validate_flux(self)
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        timestep: Array,
        encoder_hidden_states: Array,
        pooled_projections: Array,
        img_ids: Array,
        txt_ids: Array,
        guidance: Array | None = None,
    ) -> Array:
        """hidden_states (B, N, in_channels) packed latents (`pack_latents`); timestep scalar or (B,)
        sigma in 0..1 (scaled by 1000 here); encoder_hidden_states (B, L, joint_attention_dim) (T5);
        pooled_projections (B, pooled_projection_dim) (pooled CLIP-L); img_ids (N, 3)
        (`latent_image_ids`), txt_ids (L, 3) (zeros in the pipelines); guidance scalar or (B,)
        (the guidance scale, only and always with guidance_embeds) -> (B, N, patch_size^2 *
        out_channels) float32.
        """
        dtype = compute_dtype(self.dtype)
        d = self.inner_dim
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.in_channels:
            raise ValueError(
                f"FluxTransformer2D expects hidden_states of shape (B, N, {self.in_channels}), "
                f"got {hidden_states.shape}"
            )
        b, n, _ = hidden_states.shape
        ctx_shape = encoder_hidden_states.shape
        if len(ctx_shape) != 3 or (ctx_shape[0], ctx_shape[2]) != (b, self.joint_attention_dim):
            raise ValueError(
                f"encoder_hidden_states must have shape ({b}, L, {self.joint_attention_dim}), got {ctx_shape}"
            )
        if pooled_projections.shape != (b, self.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must have shape ({b}, {self.pooled_projection_dim}), "
                f"got {pooled_projections.shape}"
            )
        if (guidance is None) == self.guidance_embeds:
            raise ValueError(
                "FluxTransformer2D: guidance must be given exactly when guidance_embeds is True "
                f"(guidance_embeds={self.guidance_embeds})"
            )
        # diffusers still accepts batched (B, S, 3) ids (deprecated) and uses the first row
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        if img_ids.shape[0] != n or txt_ids.shape[0] != ctx_shape[1]:
            raise ValueError(
                f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must have one row per image token "
                f"({n}) / text token ({ctx_shape[1]})"
            )

        def per_sample(value: Array, what: str) -> Array:
            v = jnp.asarray(value, jnp.float32)
            v = jnp.broadcast_to(v, (b,)) if v.ndim == 0 else v
            if v.shape != (b,):
                raise ValueError(f"{what} must be a scalar or have shape ({b},), got {v.shape}")
            return v * TIME_SCALE

        t = per_sample(timestep, "timestep")
        x = _dense(d, dtype, "x_embedder")(hidden_states.astype(dtype))
        if self.guidance_embeds:
            g = per_sample(guidance, "guidance")
            temb = CombinedTimestepGuidanceTextProjEmbeddings(d, dtype, name="time_text_embed")(
                t, g, pooled_projections
            )
        else:
            temb = CombinedTimestepTextProjEmbeddings(d, dtype, name="time_text_embed")(t, pooled_projections)
        context = _dense(d, dtype, "context_embedder")(encoder_hidden_states.astype(dtype))
        # numpy keeps concrete ids concrete, so flux_rotary can take its float64 path
        traced = any(isinstance(i, jax.core.Tracer) for i in (txt_ids, img_ids))
        xp = jnp if traced else np
        ids = xp.concatenate([xp.asarray(txt_ids, xp.float32), xp.asarray(img_ids, xp.float32)], axis=0)
        rotary = flux_rotary(ids, self.axes_dims_rope)

        double = nn.remat(FluxTransformerBlock) if self.remat else FluxTransformerBlock
        single = nn.remat(FluxSingleTransformerBlock) if self.remat else FluxSingleTransformerBlock
        heads, dim_head = self.num_attention_heads, self.attention_head_dim
        for i in range(self.num_layers):
            x, context = double(heads, dim_head, dtype=dtype, name=f"transformer_blocks_{i}")(
                x, context, temb, rotary
            )
        h = jnp.concatenate([context, x], axis=1)
        for i in range(self.num_single_layers):
            h = single(heads, dim_head, dtype=dtype, name=f"single_transformer_blocks_{i}")(h, temb, rotary)
        x = h[:, context.shape[1] :]

        x = AdaLayerNormContinuous(dtype, name="norm_out")(x, temb)
        p = self.patch_size
        return _dense(p * p * self.output_channels, dtype, "proj_out")(x).astype(jnp.float32)


def validate_flux(m: Any) -> None:
    """ValueError naming the field when a config cannot build a valid network."""
    axes = m.axes_dims_rope
    if not isinstance(axes, tuple) or not all(isinstance(a, int) and a > 0 and a % 2 == 0 for a in axes):
        raise ValueError(
            f"FluxTransformer2D: axes_dims_rope must be a tuple of positive even ints, got {axes!r}"
        )
    if sum(axes) != m.attention_head_dim:
        raise ValueError(
            f"FluxTransformer2D: axes_dims_rope {axes} must sum to attention_head_dim = "
            f"{m.attention_head_dim} (the rotary embedding covers each head)"
        )
    if m.num_layers < 0 or m.num_single_layers < 0:
        raise ValueError(
            f"FluxTransformer2D: num_layers {m.num_layers} and num_single_layers {m.num_single_layers} "
            "must be >= 0"
        )
    compute_dtype(m.dtype)


# ---- config and weights ----------------------------------------------------------------------
def flux_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    remat: bool = False,
    what: str = "transformer/config.json (FluxTransformer2DModel)",
) -> FluxTransformer2D:
    """The module a diffusers `transformer/config.json` describes; an unknown option, or a value this
    twin cannot build, is a UserError naming it and the file."""
    opts = read_options(config, DEFAULTS, what=what)
    axes = opts["axes_dims_rope"]
    if not isinstance(axes, (list, tuple)):
        raise UserError(f"{what}: axes_dims_rope must be a list of ints, got {axes!r}")
    opts["axes_dims_rope"] = tuple(axes)
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"Flux compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        return FluxTransformer2D(**opts, dtype=name, remat=remat)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None


def example_inputs(module: FluxTransformer2D, batch: int = 1, seq_len: int = 1) -> dict[str, Any]:
    """Smallest inputs that create every param of `module` (for init / eval_shape)."""
    n_axes = len(module.axes_dims_rope)
    return {
        "hidden_states": jnp.zeros((batch, 1, module.in_channels)),
        "timestep": jnp.zeros((batch,)),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, module.joint_attention_dim)),
        "pooled_projections": jnp.zeros((batch, module.pooled_projection_dim)),
        "img_ids": np.zeros((1, n_axes), np.float32),
        "txt_ids": np.zeros((seq_len, n_axes), np.float32),
        "guidance": jnp.zeros((batch,)) if module.guidance_embeds else None,
    }


def param_shapes(module: FluxTransformer2D) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), **example_inputs(module)))


def load_flux_transformer(
    folder: str, dtype: Any = "float32", *, variant: str | None = None, remat: bool = False
) -> tuple[FluxTransformer2D, dict[str, Any]]:
    """(module, params) of a diffusers Flux `transformer/` folder (config.json + safetensors, single or
    sharded, optional fp16/bf16 `variant`).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype. A missing /
    unexpected key or a mis-shaped tensor is a UserError naming the key and file.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    module = flux_from_config(
        read_json(config_path), dtype=dtype, remat=remat, what=f"{config_path} (FluxTransformer2DModel)"
    )
    state = load_component_weights(folder, variant)
    params = params_from_torch(
        state, param_shapes(module), FLUX_LIST_NAMES, what=weights_file(folder, variant)
    )
    return module, params


def flux_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Flax FluxTransformer2D params -> {diffusers key: float32 numpy array in torch layout} (loads
    into `FluxTransformer2DModel.load_state_dict(..., strict=True)`)."""
    return params_to_torch(params, FLUX_LIST_NAMES)
