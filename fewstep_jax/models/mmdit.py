"""MMDiT pieces (SD3 / SD3.5, and the joint-attention half of a Flux twin): joint attention over
[image; text] tokens, adaptive layer norms and the JointTransformerBlock, params named like
diffusers' keys.

Twins of diffusers 0.42:
  * `attention_processor.Attention` with `JointAttnProcessor2_0` -> `JointAttention`: image tokens
    through to_q / to_k / to_v, text tokens through add_q_proj / add_k_proj / add_v_proj, each
    (B, L, heads, dim_head) optionally normalised per head (qk_norm: norm_q / norm_k on the image
    stream, norm_added_q / norm_added_k on the text stream), one softmax attention over the
    concatenated [image; text] sequence (no mask), split back: image -> to_out_0, text ->
    to_add_out (absent with context_pre_only). Without a context it is plain self-attention
    with the same qk norms (SD3.5's attn2).
  * `normalization.AdaLayerNormZero` / `SD35AdaLayerNormZeroX` -> `AdaLayerNormZero`
    (`dual_attention`): linear(silu(temb)) -> 6 (9) chunks (shift, scale, gate) for the attention,
    the MLP [and attn2]; LayerNorm(eps 1e-6, no affine).
  * `normalization.AdaLayerNormContinuous` (layer_norm, no affine) -> `AdaLayerNormContinuous`:
    norm(x) * (1 + scale) + shift with (scale, shift) = linear(silu(cond)) (scale first).
  * `normalization.RMSNorm` -> `RMSNorm` (variance in float32).
  * `embeddings.CombinedTimestepTextProjEmbeddings` (`PixArtAlphaTextProjection` with silu for the
    pooled text) -> `CombinedTimestepTextProjEmbeddings`, `TextProjection`.
  * `attention.JointTransformerBlock` -> `JointTransformerBlock`, D = heads * dim_head:
        h, (g, b2, s2, g2)[, h2, g_2] = norm1(x, temb)
        c_h, (cg, cb2, cs2, cg2)      = norm1_context(c, temb)   [AdaLayerNormContinuous when
                                                                   context_pre_only]
        a, ca = attn(h, c_h);  x += g * a;  [x += g_2 * attn2(h2)]
        x += g2 * ff(norm2(x) * (1 + s2) + b2)
        c += cg * ca;  c += cg2 * ff_context(norm2_context(c) * (1 + cs2) + cb2)
                                                                  [not with context_pre_only]
    FeedForward is models/attention.FeedForward (gelu-approximate, mult 4).

Compute in `dtype`, params float32, attention logits and softmax in float32 (models/attention.
dot_product_attention). Names map 1:1 onto diffusers keys by `state_dict.torch_key` with
`MMDIT_LIST_NAMES` (`attn/to_out_0/kernel` <-> `attn.to_out.0.weight`, `attn/norm_q/scale` <->
`attn.norm_q.weight`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewstep_jax.models.attention import TRANSFORMER_LIST_NAMES, FeedForward, dot_product_attention
from fewstep_jax.models.embeddings import Dtype, TimestepEmbedding, timestep_embedding

Array = jax.Array

MMDIT_LIST_NAMES = TRANSFORMER_LIST_NAMES
# qk_norm values implemented (diffusers' Attention also knows fp32_layer_norm, *_across_heads, l2)
QK_NORMS = (None, "rms_norm", "layer_norm")
# eps of every norm inside the SD3 block (diffusers builds its Attention with eps=1e-6)
NORM_EPS = 1e-6
# sinusoid width of the timestep embedding (diffusers' Timesteps(256, True, 0))
TIME_FREQ_DIM = 256


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(dtype: Dtype, name: str | None = None, affine: bool = False) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=NORM_EPS, use_bias=affine, use_scale=affine, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class RMSNorm(nn.Module):
    """diffusers `RMSNorm` with a weight: x / sqrt(mean(x^2) + eps) * weight over the last axis.

    The mean square is float32 whatever the compute dtype (as diffusers does); the result is cast
    back to `dtype` before the weight multiplies it. (..., D) -> (..., D).
    """

    eps: float = NORM_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * weight.astype(self.dtype)


def qk_norm_layer(kind: str | None, dtype: Dtype, name: str) -> nn.Module | None:
    """The per-head norm diffusers' Attention builds for `qk_norm` (None: no norm).

    "rms_norm": RMSNorm with a weight (SD3.5, Flux); "layer_norm": LayerNorm with weight and bias.
    """
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(NORM_EPS, dtype, name=name)
    if kind == "layer_norm":
        return _layer_norm(dtype, name, affine=True)
    raise ValueError(f"qk_norm {kind!r} not in {QK_NORMS}")


class JointAttention(nn.Module):
    """diffusers `Attention` + `JointAttnProcessor2_0` (SD3's MMDiT attention).

    x (B, N, D) image tokens, context (B, M, Dc) text tokens or None ->
      context given:  (x_out (B, N, out_dim), context_out (B, M, out_dim), None if context_pre_only)
      context None:   x_out (B, N, out_dim)  (self-attention over the image tokens only; no add_*
                      projections are created: SD3.5's attn2)
    Inner width heads * dim_head; every projection has a bias (SD3's bias=True).

    Flux (`FluxAttention` + `FluxAttnProcessor`) uses the same projections with `text_first`
    (the joint sequence is [text; image]), `rotary` = (cos, sin) (S, dim_head) over that sequence
    applied to q and k after the qk norm (`apply_rotary`), and `pre_only` (no to_out_0: the
    single-stream blocks return the (B, N, heads * dim_head) attention output unprojected).
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    qk_norm: str | None = None
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32
    text_first: bool = False
    pre_only: bool = False

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, rotary: tuple[Array, Array] | None = None
    ) -> Array | tuple[Array, Array | None]:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"JointAttention: qk_norm {self.qk_norm!r} not in {QK_NORMS}")
        b, n, dx = x.shape
        inner = self.heads * self.dim_head
        out_dim = self.out_dim or dx

        def project(stream: Array, prefix: str, suffix: str, norm_q: str, norm_k: str) -> list[Array]:
            out = []
            for part, norm in (("q", norm_q), ("k", norm_k), ("v", None)):
                a = _dense(inner, self.dtype, f"{prefix}{part}{suffix}")(stream)
                a = a.reshape(b, stream.shape[1], self.heads, self.dim_head)
                layer = qk_norm_layer(self.qk_norm, self.dtype, norm) if norm else None
                out.append(a if layer is None else layer(a))
            return out

        q, k, v = project(x, "to_", "", "norm_q", "norm_k")
        m = 0 if context is None else context.shape[1]
        if context is not None:
            cq, ck, cv = project(context, "add_", "_proj", "norm_added_q", "norm_added_k")
            pairs = ((cq, q), (ck, k), (cv, v)) if self.text_first else ((q, cq), (k, ck), (v, cv))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in pairs)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        out = dot_product_attention(q, k, v).reshape(b, -1, inner)
        x_part, c_part = (out[:, m:], out[:, :m]) if self.text_first else (out[:, :n], out[:, n:])
        if self.pre_only:
            return x_part if context is None else (x_part, c_part)
        x_out = _dense(out_dim, self.dtype, "to_out_0")(x_part)
        if context is None:
            return x_out
        if self.context_pre_only:
            return x_out, None
        return x_out, _dense(out_dim, self.dtype, "to_add_out")(c_part)


def apply_rotary(x: Array, rotary: tuple[Array, Array]) -> Array:
    """diffusers `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1)`:
    x (B, S, H, D), cos / sin (S, D) (each frequency repeated for its (even, odd) pair) ->
    x * cos + rot(x) * sin with rot pairing (x0, x1) -> (-x1, x0); float32 math, x's dtype out."""
    cos, sin = (a.astype(jnp.float32)[None, :, None, :] for a in rotary)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class AdaLayerNormZero(nn.Module):
    """diffusers `AdaLayerNormZero` (emb given) / `SD35AdaLayerNormZeroX` (`dual_attention`).

    x (B, L, D), temb (B, Dt) -> (norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp,
    scale_mlp, gate_mlp) with the modulations (B, 1, D); with dual_attention also
    (norm(x) * (1 + scale_msa2) + shift_msa2, gate_msa2) for attn2.
    """

    dual_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> tuple[Array, ...]:
        d = x.shape[-1]
        chunks = 9 if self.dual_attention else 6
        emb = _dense(chunks * d, self.dtype, "linear")(nn.silu(temb.astype(self.dtype)))
        mods = jnp.split(emb[:, None, :], chunks, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = _layer_norm(self.dtype)(x)
        out = (normed * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        if not self.dual_attention:
            return out
        shift_msa2, scale_msa2, gate_msa2 = mods[6:]
        return (*out, normed * (1 + scale_msa2) + shift_msa2, gate_msa2)


class AdaLayerNormContinuous(nn.Module):
    """diffusers `AdaLayerNormContinuous(dim, cond_dim, elementwise_affine=False, eps=1e-6)` as SD3
    and Flux build it: x (B, L, D), cond (B, Dc) -> norm(x) * (1 + scale) + shift, where
    (scale, shift) = linear(silu(cond)) split in that order."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        emb = _dense(2 * x.shape[-1], self.dtype, "linear")(nn.silu(cond.astype(self.dtype)))
        scale, shift = jnp.split(emb[:, None, :], 2, axis=-1)
        return _layer_norm(self.dtype)(x) * (1 + scale) + shift


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock` (see the module docstring for the equations).

    x (B, N, D) image tokens, context (B, M, D) text tokens, temb (B, D) ->
    (x (B, N, D), context (B, M, D), or None with context_pre_only: the last block of SD3 computes
    no text output). D = heads * dim_head.
    """

    heads: int
    dim_head: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    use_dual_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, temb: Array) -> tuple[Array, Array | None]:
        d = self.heads * self.dim_head
        if x.shape[-1] != d or context.shape[-1] != d:
            raise ValueError(
                f"JointTransformerBlock: image {x.shape} and text {context.shape} tokens must both be "
                f"heads * dim_head = {d} wide"
            )
        mods = AdaLayerNormZero(self.use_dual_attention, self.dtype, name="norm1")(x, temb)
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:5]
        if self.context_pre_only:
            c_h = AdaLayerNormContinuous(self.dtype, name="norm1_context")(context, temb)
        else:
            c_h, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
                False, self.dtype, name="norm1_context"
            )(context, temb)

        attn = lambda name, pre_only: JointAttention(
            self.heads, self.dim_head, d, self.qk_norm, pre_only, self.dtype, name=name
        )
        a, ca = attn("attn", self.context_pre_only)(h, c_h)
        x = x + gate_msa * a
        if self.use_dual_attention:
            h2, gate_msa2 = mods[5:]
            x = x + gate_msa2 * attn("attn2", False)(h2)
        ff = lambda name: FeedForward(dim_out=d, activation="gelu-approximate", dtype=self.dtype, name=name)
        x = x + gate_mlp * ff("ff")(_layer_norm(self.dtype)(x) * (1 + scale_mlp) + shift_mlp)
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa * ca
        c_h = _layer_norm(self.dtype)(context) * (1 + c_scale_mlp) + c_shift_mlp
        return x, context + c_gate_mlp * ff("ff_context")(c_h)


class TextProjection(nn.Module):
    """diffusers `PixArtAlphaTextProjection`: linear_1 -> act -> linear_2, (B, ..., C) -> (B, ..., dim).

    act: "silu" (SD3 / Flux pooled text) or "gelu_tanh" (caption projections).
    """

    dim: int
    act: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _dense(self.dim, self.dtype, "linear_1")(x.astype(self.dtype))
        if self.act == "silu":
            h = nn.silu(h)
        elif self.act == "gelu_tanh":
            h = nn.gelu(h, approximate=True)
        else:
            raise ValueError(f"TextProjection: act {self.act!r} not in ('silu', 'gelu_tanh')")
        return _dense(self.dim, self.dtype, "linear_2")(h)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """diffusers `CombinedTimestepTextProjEmbeddings`: timestep (B,) in 0..1000 units, pooled text
    (B, P) -> timestep_embedder(sin(t), 256 freqs, cos first, shift 0) + text_embedder(pooled)
    (silu), (B, dim)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: Array, pooled: Array) -> Array:
        freqs = timestep_embedding(timestep, TIME_FREQ_DIM, flip_sin_to_cos=True, freq_shift=0)
        freqs = freqs.astype(self.dtype)
        emb = TimestepEmbedding(self.dim, dtype=self.dtype, name="timestep_embedder")(freqs)
        return emb + TextProjection(self.dim, "silu", self.dtype, name="text_embedder")(pooled)
