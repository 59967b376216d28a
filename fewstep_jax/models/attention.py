"""Transformer pieces of the diffusers latent models: multi-head (cross-)attention, GEGLU/GELU
feed-forward, BasicTransformerBlock and the spatial Transformer2DModel (NHWC).

Twins of diffusers 0.42 `attention_processor.Attention` (default processor), `attention.FeedForward`
(`activations.GEGLU` / `GELU`), `attention.BasicTransformerBlock` (norm_type "layer_norm" for the SD
UNets, "ada_norm_single" for PixArt) and
`transformers.transformer_2d.Transformer2DModel` (continuous input). Param names follow diffusers'
submodule names (`to_q`, `to_out_0`, `ff/net_0/proj`, `transformer_blocks_0`, ...) so that
`models.state_dict.torch_key` with `TRANSFORMER_LIST_NAMES` maps them 1:1 onto its keys.
Compute in `dtype`, params float32, attention logits and softmax in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.models.embeddings import Dtype
from fewstep_jax.models.layers import conv, group_norm

Array = jax.Array

# ModuleList names inside these modules (for `state_dict.torch_key`)
TRANSFORMER_LIST_NAMES = ("transformer_blocks", "to_out", "net")
# diffusers' additive value for a masked-out key (it adds (1 - mask) * -10000 to the logits)
MASK_BIAS = -10000.0
FF_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")
BLOCK_NORM_TYPES = ("layer_norm", "ada_norm_single")


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def dot_product_attention(
    q: Array, k: Array, v: Array, bias: Array | None = None, upcast: bool = False
) -> Array:
    """softmax(q k^T / sqrt(D) + bias) v over heads: q (B, Lq, H, D), k, v (B, Lk, H, D),
    bias broadcastable to (B, H, Lq, Lk) -> (B, Lq, H, D) in v's dtype.

    Logits and softmax are float32; `upcast` (diffusers' upcast_attention) also makes the q.k
    products float32 when the compute dtype is lower.
    """
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def mask_bias(mask: Array | None) -> Array | None:
    """A keep-mask (B, Lk) or (B, Lq, Lk) (1/True = attend) -> additive bias (B, 1, 1|Lq, Lk)."""
    if mask is None:
        return None
    bias = (1.0 - jnp.asarray(mask, jnp.float32)) * MASK_BIAS
    return bias[:, None, None, :] if bias.ndim == 2 else bias[:, None]


class Attention(nn.Module):
    """diffusers `Attention` (query_dim -> heads * dim_head -> out_dim): to_q on x, to_k / to_v on
    `context` (x itself when None), to_out_0; no residual, no norms.

    x (B, Lq, query_dim), context (B, Lk, cross_attention_dim), mask (B, Lk) or (B, Lq, Lk) keep
    -> (B, Lq, out_dim or query_dim). `cross_attention_dim` None is self-attention; a context of
    another width is a ValueError (the config's value decides the to_k / to_v shapes).
    """

    heads: int
    dim_head: int
    cross_attention_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    out_dim: int | None = None
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
        if context is None:
            context = x
        elif self.cross_attention_dim is not None and context.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"Attention: context width {context.shape[-1]} != cross_attention_dim "
                f"{self.cross_attention_dim}"
            )
        b, lq, dq = x.shape
        inner = self.heads * self.dim_head
        q = _dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
        k = _dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
        v = _dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
        out = dot_product_attention(split(q), split(k), split(v), mask_bias(mask), self.upcast)
        out = out.reshape(b, lq, inner)
        return _dense(self.out_dim or dq, self.dtype, "to_out_0", self.out_bias)(out)


class _GatedProj(nn.Module):
    """`net.0` of diffusers FeedForward: `proj` then GEGLU (value * gelu(gate)) or GELU."""

    inner: int
    activation: str
    bias: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.activation == "geglu":
            value, gate = jnp.split(_dense(self.inner * 2, self.dtype, "proj", self.bias)(x), 2, axis=-1)
            return value * nn.gelu(gate, approximate=False)
        h = _dense(self.inner, self.dtype, "proj", self.bias)(x)
        return nn.gelu(h, approximate=self.activation == "gelu-approximate")


class FeedForward(nn.Module):
    """diffusers `FeedForward`: net_0 (proj + activation) -> dropout -> net_2,
    (B, L, D) -> (B, L, dim_out or D).

    activation: "geglu" (SD UNets), "gelu" (exact), "gelu-approximate" (tanh; PixArt / SD3).
    inner width: `inner_dim`, else int(D * mult).
    """

    dim_out: int | None = None
    mult: float = 4
    inner_dim: int | None = None
    activation: str = "geglu"
    bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.activation not in FF_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation {self.activation!r} not in {FF_ACTIVATIONS}")
        dim = x.shape[-1]
        inner = self.inner_dim or int(dim * self.mult)
        h = _GatedProj(inner, self.activation, self.bias, self.dtype, name="net_0")(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return _dense(self.dim_out or dim, self.dtype, "net_2", self.bias)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`, pre-norm residuals, for two `norm_type`s:

    "layer_norm" (SD UNets):
        x += attn1(norm1(x)); x += attn2(norm2(x), context) [if cross_attention_dim];
        x += ff(norm3(x)).
    "ada_norm_single" (PixArt's adaLN-single): temb (B, 6 * dim), the shared timestep projection,
    plus the block's own `scale_shift_table` (6, dim) give (shift, scale, gate) for attention and MLP:
        x += g_msa * attn1(norm1(x) * (1 + s_msa) + b_msa)
        x += attn2(x, context)                    [no norm, no modulation, as PixArt does]
        x += g_mlp * ff(norm2(x) * (1 + s_mlp) + b_mlp)   [norm2 serves the MLP; there is no norm3]

    x (B, L, dim), context (B, Lc, cross_attention_dim), context_mask (B, Lc) keep -> (B, L, dim).
    """

    heads: int
    dim_head: int
    cross_attention_dim: int | None = None
    attention_bias: bool = False
    attention_out_bias: bool = True
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    activation_fn: str = "geglu"
    ff_inner_dim: int | None = None
    ff_bias: bool = True
    dropout: float = 0.0
    norm_type: str = "layer_norm"
    dtype: Dtype = jnp.float32

    def _norm(self, name: str) -> nn.LayerNorm:
        affine = self.norm_elementwise_affine
        return nn.LayerNorm(
            epsilon=self.norm_eps,
            use_bias=affine,
            use_scale=affine,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    def _attention(self, name: str, cross: int | None) -> Attention:
        return Attention(
            self.heads,
            self.dim_head,
            cross_attention_dim=cross,
            qkv_bias=self.attention_bias,
            out_bias=self.attention_out_bias,
            upcast=self.upcast_attention,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        temb: Array | None = None,
    ) -> Array:
        """temb (B, 6 * dim): the modulation input of "ada_norm_single" (None for "layer_norm")."""
        if self.norm_type not in BLOCK_NORM_TYPES:
            raise ValueError(f"BasicTransformerBlock: norm_type {self.norm_type!r} not in {BLOCK_NORM_TYPES}")
        single = self.norm_type == "ada_norm_single"
        if single != (temb is not None):
            raise ValueError(
                f'BasicTransformerBlock: temb (B, 6 * dim) is needed by norm_type="ada_norm_single" and '
                f"only by it (norm_type={self.norm_type!r}, temb {'given' if temb is not None else 'None'})"
            )
        ff = FeedForward(
            inner_dim=self.ff_inner_dim,
            activation=self.activation_fn,
            bias=self.ff_bias,
            dropout=self.dropout,
            dtype=self.dtype,
            name="ff",
        )
        if not single:
            x = x + self._attention("attn1", None)(self._norm("norm1")(x))
            x = self._cross_attention(x, context, context_mask, self._norm("norm2"))
            return x + ff(self._norm("norm3")(x), train)

        b, _, dim = x.shape
        table = self.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (6, dim), jnp.float32)
        mod = (table[None] + temb.astype(jnp.float32).reshape(b, 6, dim)).astype(self.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        h = self._norm("norm1")(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self._attention("attn1", None)(h)
        x = self._cross_attention(x, context, context_mask, None)
        h = self._norm("norm2")(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * ff(h, train)

    def _cross_attention(
        self, x: Array, context: Array | None, context_mask: Array | None, norm: nn.Module | None
    ) -> Array:
        """x + attn2(norm(x), context) when the block has cross-attention, else x."""
        if self.cross_attention_dim is None:
            return x
        if context is None:
            raise ValueError("BasicTransformerBlock: cross-attention needs encoder_hidden_states")
        h = x if norm is None else norm(x)
        return x + self._attention("attn2", self.cross_attention_dim)(h, context, context_mask)


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input, as the SD UNets build it:
    GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or Linear with `use_linear_projection`) ->
    `num_layers` BasicTransformerBlocks over the H*W tokens -> proj_out -> + input.

    x (B, H, W, C), context (B, L, cross_attention_dim), context_mask (B, L) keep -> (B, H, W, C).
    `remat` rematerialises each transformer block in the backward pass.
    """

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    cross_attention_dim: int | None = None
    attention_bias: bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    activation_fn: str = "geglu"
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        b, hgt, wid, c = x.shape
        inner = self.num_attention_heads * self.attention_head_dim
        h = group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = _dense(inner, self.dtype, "proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, self.dtype, "proj_in", kernel=1)(h).reshape(b, hgt * wid, inner)
        block_cls = (
            nn.remat(BasicTransformerBlock, static_argnums=(4,)) if self.remat else BasicTransformerBlock
        )
        for i in range(self.num_layers):
            h = block_cls(
                self.num_attention_heads,
                self.attention_head_dim,
                cross_attention_dim=self.cross_attention_dim,
                attention_bias=self.attention_bias,
                upcast_attention=self.upcast_attention,
                norm_eps=self.norm_eps,
                activation_fn=self.activation_fn,
                dropout=self.dropout,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, context_mask, train)
        if self.use_linear_projection:
            h = _dense(c, self.dtype, "proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, self.dtype, "proj_out", kernel=1)(h.reshape(b, hgt, wid, inner))
        return h + x
