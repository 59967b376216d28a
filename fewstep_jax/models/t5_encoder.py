"""T5Encoder: a Flax Linen twin of transformers' `T5EncoderModel`, the text encoder of
PixArt-alpha / PixArt-Sigma (t5-v1_1-xxl), SD3 (`text_encoder_3`) and Flux (`text_encoder_2`).

Architecture (transformers 5.24 `models/t5/modeling_t5.py`, encoder stack only):
  x = shared[input_ids]
  per block i:  x += o(attn(q, k, v of layer_norm(x); bias = position_bias + mask))  (layer.0)
                x += wo(act(wi(n)))  or  wo(act(wi_0(n)) * wi_1(n)),  n = layer_norm(x)  (layer.1)
  last_hidden_state = final_layer_norm(x)
Layer norms are T5's RMS norm (no mean, no bias, variance in float32). Attention has no
1/sqrt(d_kv) scaling; the logits get a learned relative position bias (bidirectional buckets:
half per direction, exact up to num_buckets / 4, log-spaced up to max_distance), computed by
block 0 (the only block holding `relative_attention_bias`) and shared by every block. Masked keys
get float32's min, as transformers adds `finfo(dtype).min`, so their weight is exactly 0; padded
query positions are still computed (from the unmasked keys), as in transformers.
Feed-forward: `feed_forward_proj` "relu" (T5) or "gated-gelu" (T5 v1.1 / flan-T5, gelu_new = tanh
approximation); a config's own `dense_act_fn` / `is_gated_act` take precedence, as in transformers.

Precision: params float32; `dtype` ("float32" | "bfloat16") is the compute dtype of the matmuls.
The residual stream, the norms' statistics and the attention softmax stay float32 and the output is
float32. transformers' `_keep_in_fp32_modules = ["wo"]` keeps the feed-forward output projection in
float32 only for float16 loads (T5 v1.1 XXL's activations overflow float16's 65504; the float32
`wo` output then also promotes the residual sum to float32). bfloat16 has float32's exponent range,
so `wo` runs in the compute dtype here, as in transformers' bfloat16 path; the float32 residual
stream is this twin's choice (cheap, and it keeps 24 layers of sums at float32 precision).

Param paths map 1:1 onto transformers keys by `state_dict.torch_key` with `T5_LIST_NAMES`:
`encoder/block_0/layer_1/DenseReluDense/wi_0/kernel` <->
`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`, `shared/embedding` <-> `shared.weight`.

Use: `module, params = load_t5_encoder("pixart/text_encoder")`, then
`module.apply({"params": params}, input_ids, attention_mask)` -> (B, L, d_model) float32.
PixArt passes the tokenizer's attention mask; SD3 and Flux call T5 without one (attention_mask=None).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.models.attention import dot_product_attention
from fewstep_jax.models.embeddings import DTYPES, compute_dtype
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch, torch_key

Array = jax.Array

T5_LIST_NAMES = ("block", "layer")
ACTIVATIONS = ("relu", "gelu_new", "gelu", "silu")
# tied to shared.weight in transformers; real checkpoints sometimes store it as well
TIED_KEY = "encoder.embed_tokens.weight"
# parts of a full T5 (T5ForConditionalGeneration) checkpoint the encoder does not use
# (transformers' T5EncoderModel ignores "decoder" keys on load)
UNUSED_PREFIXES = ("decoder.", "lm_head.")

# config.json options this twin implements, with T5Config's defaults; dense_act_fn / is_gated_act
# None = derived from feed_forward_proj
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "dense_act_fn": None,
    "is_gated_act": None,
}
# the encoder of a decoder-only T5 (causal buckets) is not implemented
FIXED: dict[str, Any] = {"is_decoder": False, "add_cross_attention": False}
# decoder-only, tokenisation, training and serialisation options: they change nothing here
IGNORED = (
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "num_decoder_layers",
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "dropout_rate",
    "classifier_dropout",
    "initializer_factor",
    "tie_word_embeddings",
    "scale_decoder_outputs",
    "use_cache",
    "is_encoder_decoder",
    "output_past",
    "gradient_checkpointing",
    "n_positions",
    "task_specific_params",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
)


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 bucket of each key - query offset (int array) -> int array in [0, num_buckets).

    Half the buckets per direction (positive offsets in the upper half); in each half, offsets
    below num_buckets / 4 have their own bucket, larger ones share log-spaced buckets up to
    max_distance, beyond which all fall in the last. Computed on the host in float32 with
    torch's operation order, so the integer boundaries (e.g. offset 16 at 32 buckets / 128) round
    as transformers' do.
    """
    half = num_buckets // 2
    max_exact = half // 2
    n = np.abs(relative_position)
    ratio = n.astype(np.float32) / np.float32(max_exact)
    # offsets below max_exact take the exact branch; clamping the ratio only avoids log(0)
    log_part = np.log(np.maximum(ratio, np.float32(1))) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_part * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return np.where(relative_position > 0, half, 0) + np.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """T5's RMS norm: x / sqrt(mean(x^2) + eps) * weight, no mean, no bias; statistics in float32.
    (..., D) -> (..., D) in `dtype`."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return (weight * (x * jax.lax.rsqrt(variance + self.eps))).astype(self.dtype)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class T5Attention(nn.Module):
    """T5 self-attention (no 1/sqrt(d_kv) scaling). With `relative_attention` this layer owns the
    `relative_attention_bias` table and builds the position bias (1, H, L, L); otherwise
    `position_bias` must be given. x (B, L, D), mask_bias (B, 1, 1, L) float32 or None
    -> (out (B, L, D), position_bias)."""

    num_heads: int
    d_kv: int
    relative_attention: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, mask_bias: Array | None, position_bias: Array | None = None
    ) -> tuple[Array, Array]:
        b, length, d_model = x.shape
        inner = self.num_heads * self.d_kv
        split = lambda a: a.reshape(b, length, self.num_heads, self.d_kv)
        q = split(_dense(inner, self.dtype, "q")(x))
        k = split(_dense(inner, self.dtype, "k")(x))
        v = split(_dense(inner, self.dtype, "v")(x))
        if self.relative_attention:
            table = nn.Embed(
                self.num_buckets, self.num_heads, param_dtype=jnp.float32, name="relative_attention_bias"
            )
            positions = np.arange(length)
            buckets = relative_position_bucket(
                positions[None, :] - positions[:, None], self.num_buckets, self.max_distance
            )
            position_bias = jnp.transpose(table(jnp.asarray(buckets, jnp.int32)), (2, 0, 1))[None]
        elif position_bias is None:
            raise ValueError("T5Attention: a block without relative_attention needs block 0's position_bias")
        bias = position_bias if mask_bias is None else position_bias + mask_bias
        # dot_product_attention divides the logits by sqrt(d_kv); T5 does not scale: undo it on q
        out = dot_product_attention(q * math.sqrt(self.d_kv), k, v, bias)
        out = _dense(d_model, self.dtype, "o")(out.reshape(b, length, inner))
        return out, position_bias


class T5DenseActDense(nn.Module):
    """`DenseReluDense`: wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) when `gated`."""

    d_ff: int
    activation: str
    gated: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = {
            "relu": nn.relu,
            "gelu_new": lambda h: nn.gelu(h, approximate=True),
            "gelu": lambda h: nn.gelu(h, approximate=False),
            "silu": nn.silu,
        }[self.activation]
        if self.gated:
            h = act(_dense(self.d_ff, self.dtype, "wi_0")(x)) * _dense(self.d_ff, self.dtype, "wi_1")(x)
        else:
            h = act(_dense(self.d_ff, self.dtype, "wi")(x))
        return _dense(x.shape[-1], self.dtype, "wo")(h)


class _SelfAttentionLayer(nn.Module):
    """`layer.0`: x + SelfAttention(layer_norm(x)), residual in float32."""

    num_heads: int
    d_kv: int
    relative_attention: bool
    num_buckets: int
    max_distance: int
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array | None, position_bias: Array | None) -> tuple[Array, Array]:
        h = T5LayerNorm(self.eps, self.dtype, name="layer_norm")(x)
        attention = T5Attention(
            self.num_heads,
            self.d_kv,
            self.relative_attention,
            self.num_buckets,
            self.max_distance,
            self.dtype,
            name="SelfAttention",
        )
        out, position_bias = attention(h, mask_bias, position_bias)
        return x + out.astype(jnp.float32), position_bias


class _FeedForwardLayer(nn.Module):
    """`layer.1`: x + DenseReluDense(layer_norm(x)), residual in float32."""

    d_ff: int
    activation: str
    gated: bool
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = T5LayerNorm(self.eps, self.dtype, name="layer_norm")(x)
        ff = T5DenseActDense(self.d_ff, self.activation, self.gated, self.dtype, name="DenseReluDense")
        return x + ff(h).astype(jnp.float32)


class T5Encoder(nn.Module):
    """transformers `T5EncoderModel`: input_ids (B, L) int, attention_mask (B, L) (1 = attend;
    None = attend everywhere, as SD3 / Flux call it) -> last_hidden_state (B, L, d_model) float32.

    `dtype` is the compute dtype name ("float32" | "bfloat16"); params stay float32.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5Encoder: dense_act_fn {self.dense_act_fn!r} not in {ACTIVATIONS}")
        half = self.relative_attention_num_buckets // 2
        if half // 2 < 1 or self.relative_attention_max_distance <= half // 2:
            raise ValueError(
                f"T5Encoder: relative_attention_num_buckets={self.relative_attention_num_buckets} must be "
                f">= 4 and relative_attention_max_distance={self.relative_attention_max_distance} above "
                "num_buckets / 4"
            )
        compute_dtype(self.dtype)

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        dtype = compute_dtype(self.dtype)
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"T5Encoder: input_ids must have shape (B, L), got {input_ids.shape}")
        shared = nn.Embed(self.vocab_size, self.d_model, param_dtype=jnp.float32, name="shared")
        x = shared(input_ids).astype(jnp.float32)
        mask_bias = None
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(bool)
            mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        return _Stack(
            self.d_kv,
            self.d_ff,
            self.num_layers,
            self.num_heads,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.layer_norm_epsilon,
            self.dense_act_fn,
            self.is_gated_act,
            dtype,
            name="encoder",
        )(x, mask_bias)


class _Stack(nn.Module):
    """`T5Stack` (encoder): blocks then final_layer_norm; block 0 builds the position bias, the
    others reuse it."""

    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array | None) -> Array:
        position_bias = None
        for i in range(self.num_layers):
            x, position_bias = _Block(
                self.d_kv,
                self.d_ff,
                self.num_heads,
                i == 0,
                self.num_buckets,
                self.max_distance,
                self.eps,
                self.activation,
                self.gated,
                self.dtype,
                name=f"block_{i}",
            )(x, mask_bias, position_bias)
        return T5LayerNorm(self.eps, jnp.float32, name="final_layer_norm")(x)


class _Block(nn.Module):
    """`T5Block` (encoder): layer_0 self-attention, layer_1 feed-forward."""

    d_kv: int
    d_ff: int
    num_heads: int
    relative_attention: bool
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array | None, position_bias: Array | None) -> tuple[Array, Array]:
        x, position_bias = _SelfAttentionLayer(
            self.num_heads,
            self.d_kv,
            self.relative_attention,
            self.num_buckets,
            self.max_distance,
            self.eps,
            self.dtype,
            name="layer_0",
        )(x, mask_bias, position_bias)
        ff = _FeedForwardLayer(self.d_ff, self.activation, self.gated, self.eps, self.dtype, name="layer_1")
        return ff(x), position_bias


# ---- config and weights ----------------------------------------------------------------------
def _activation(opts: Mapping[str, Any], what: str) -> tuple[str, bool]:
    """(dense_act_fn, is_gated_act) as T5Config derives them from feed_forward_proj, a config's
    own values taking precedence."""
    proj = str(opts["feed_forward_proj"])
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"{what}: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    gated = parts[0] == "gated"
    if opts["dense_act_fn"] is not None:
        act = opts["dense_act_fn"]
    if opts["is_gated_act"] is not None:
        gated = bool(opts["is_gated_act"])
    if act not in ACTIVATIONS:
        raise UserError(
            f"{what}: activation {act!r} is not supported (only {list(ACTIVATIONS)} are implemented)"
        )
    return act, gated


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"T5 compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def t5_encoder_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    what: str = "text_encoder/config.json (T5EncoderModel)",
) -> T5Encoder:
    """The module a transformers T5 `config.json` describes; an unknown option, or one at a value
    this twin does not implement (is_decoder=True, an activation outside ACTIVATIONS), is a
    UserError naming it."""
    opts = read_options(config, DEFAULTS, what=what, fixed=FIXED, ignored=IGNORED)
    act, gated = _activation(opts, what)
    fields = {k: v for k, v in opts.items() if k not in ("feed_forward_proj", "dense_act_fn", "is_gated_act")}
    try:
        return T5Encoder(**fields, dense_act_fn=act, is_gated_act=gated, dtype=_dtype_name(dtype))
    except (TypeError, ValueError) as err:
        raise UserError(f"{what}: {err}") from None


def param_shapes(module: T5Encoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), ids))


def t5_params_from_torch(
    state: Mapping[str, Any], module: T5Encoder, *, what: str = "T5 state dict"
) -> dict[str, Any]:
    """{transformers key: array} -> Flax params of `module`. `encoder.embed_tokens.weight` (tied
    to `shared.weight`) stands in for a missing `shared.weight` and is dropped otherwise; decoder
    and lm_head keys of a full T5 checkpoint are dropped. A missing / unexpected key or a
    mis-shaped tensor is a UserError naming it and `what`."""
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    if TIED_KEY in state:
        tied = state.pop(TIED_KEY)
        state.setdefault("shared.weight", tied)
    return params_from_torch(state, param_shapes(module), T5_LIST_NAMES, what=what)


def load_t5_encoder(
    folder: str, dtype: Any = "float32", *, variant: str | None = None
) -> tuple[T5Encoder, dict[str, Any]]:
    """(module, params) of a transformers T5 encoder folder (`text_encoder/`, `text_encoder_3/`,
    `text_encoder_2/`: config.json + safetensors weights, single or sharded, optional variant).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    module = t5_encoder_from_config(
        read_json(config_path), dtype=dtype, what=f"{config_path} (T5EncoderModel)"
    )
    state = load_component_weights(folder, variant)
    params = t5_params_from_torch(state, module, what=weights_file(folder, variant))
    return module, params


def transformers_key(path: tuple[str, ...]) -> str:
    """Flax param path (no leading "params") -> transformers T5EncoderModel key."""
    return torch_key(path, T5_LIST_NAMES)


def t5_encoder_to_torch(params: Any, *, tied: bool = True) -> dict[str, np.ndarray]:
    """Flax T5Encoder params -> {transformers key: float32 numpy array in torch layout}; `tied`
    adds `encoder.embed_tokens.weight` (= shared.weight), which `T5EncoderModel.state_dict()` holds,
    so that `load_state_dict(..., strict=True)` accepts the result."""
    state = params_to_torch(params, T5_LIST_NAMES)
    if tied:
        state[TIED_KEY] = state["shared.weight"].copy()
    return state
