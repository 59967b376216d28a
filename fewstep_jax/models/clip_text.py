"""CLIP text encoders of Stable Diffusion 1.5 / 2.1 / SDXL: a Flax Linen twin of transformers'
`CLIPTextModel` and `CLIPTextModelWithProjection`, params named like the checkpoint keys.

Architecture (transformers 5.24 `models/clip/modeling_clip.py`):
  h_0 = token_embedding[ids] + position_embedding[0..L-1]
  h_i = h + mlp(layer_norm2(h)),  h = h_{i-1} + self_attn(layer_norm1(h_{i-1}))   (pre-LN layers)
  self_attn: q_proj / k_proj / v_proj / out_proj (with biases), causal, plus the optional keep
  mask over keys; mlp: fc1 -> hidden_act ("quick_gelu" x*sigmoid(1.702x): SD 1.5's CLIP-L;
  "gelu" exact: SD 2.1's OpenCLIP-H and SDXL's OpenCLIP-bigG) -> fc2
  last_hidden_state = final_layer_norm(h_N); hidden_states = (h_0, ..., h_N) (not normed)
  pooled = last_hidden_state at one token per row: the first max of input_ids when the config's
  eos_token_id is 2 (the legacy configs of every SD text encoder), else the first eos_token_id
  text_embeds = text_projection(pooled) (no bias; WithProjection only)
A query row whose keys are all masked (left padding) gets a zero attention output, as torch's
SDPA (transformers' default attention) gives; its eager attention averages instead.

Params: {"text_model": {embeddings, encoder/layers_<i>, final_layer_norm}[, "text_projection"]}
map 1:1 onto the keys of an SD folder's text_encoder/model.safetensors by `state_dict.torch_key`
(`text_model/encoder/layers_0/self_attn/q_proj/kernel` <->
`text_model.encoder.layers.0.self_attn.q_proj.weight`); transformers 5 saves a plain
`CLIPTextModel` without the `text_model.` prefix, and both spellings load.

Use: `module, params = load_clip_text_encoder("sdxl/text_encoder_2")`, then
`out = module.apply({"params": params}, input_ids)` -> `CLIPTextOutput`; the pipelines' text
conditioning is `sd_text_states(out, clip_skip)` / `sdxl_text_states(out1, out2, clip_skip)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.models.attention import dot_product_attention
from fewstep_jax.models.embeddings import DTYPES, Dtype, compute_dtype
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch

Array = jax.Array

CLIP_LIST_NAMES = ("layers",)
PREFIX = "text_model."
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
HIDDEN_ACTS = ("quick_gelu", "gelu")
# eos_token_id of the configs written before transformers PR #24773: pool at argmax(input_ids)
LEGACY_EOS_TOKEN_ID = 2
# the position_ids buffer older transformers saved with the weights (it is always arange)
POSITION_IDS_KEY = "embeddings.position_ids"

# CLIPTextConfig's defaults (transformers 5.24) for the options that change the computation;
# use_attention_mask is diffusers' switch for passing the tokenizer's mask (carried, not used)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
    "use_attention_mask": False,
}
FIXED: dict[str, Any] = {"model_type": "clip_text_model", "pruned_heads": {}}
# keys that do not change a CLIP text encoder's forward pass: tokenisation ids, dropout (inference
# only), initialisation, storage dtype, and the generic PretrainedConfig fields (generation,
# labels, output switches) that older transformers wrote into every config.json
IGNORED = (
    "architectures",
    "bos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "dropout",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "gradient_checkpointing",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "tie_word_embeddings",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "problem_type",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
)


class CLIPTextOutput(NamedTuple):
    """What the pipelines read of a CLIP text encoder's forward pass (B rows, L tokens, D wide).

    last_hidden_state: (B, L, D) final_layer_norm(hidden_states[-1]).
    pooler_output: (B, D) last_hidden_state at the pooled (EOS) token.
    hidden_states: num_hidden_layers + 1 arrays (B, L, D): the embeddings, then each layer's
      output, none normed (transformers' `output_hidden_states=True`).
    normed_hidden_states: final_layer_norm of each hidden state (SD's clip_skip reads one; an
      unused one costs nothing under jit).
    text_embeds: (B, projection_dim) text_projection(pooler_output); None for CLIPTextModel.
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]
    normed_hidden_states: tuple[Array, ...]
    text_embeds: Array | None


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    # two-pass variance, as torch: CLIP's residual stream has outlier channels in the hundreds,
    # where E[x^2] - E[x]^2 loses float32 digits
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _activation(name: str, x: Array) -> Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
    """Multi-head self-attention, (B, L, D) -> (B, L, D); `keep` (B|1, L, L) bool says which keys
    each query sees. Logits and softmax in float32 (models.attention.dot_product_attention)."""

    heads: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array, keep: Array) -> Array:
        b, length, dim = x.shape
        split = lambda a: a.reshape(b, length, self.heads, dim // self.heads)
        q = split(_dense(dim, self.dtype, "q_proj")(x))
        k = split(_dense(dim, self.dtype, "k_proj")(x))
        v = split(_dense(dim, self.dtype, "v_proj")(x))
        bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # (B|1, 1, L, L)
        out = dot_product_attention(q, k, v, bias)
        # a query with no key to see outputs zeros (torch SDPA's rule), not the uniform average
        out = out * keep.any(axis=-1)[:, :, None, None].astype(out.dtype)
        return _dense(dim, self.dtype, "out_proj")(out.reshape(b, length, dim))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array, keep: Array) -> Array:
        x = x + CLIPAttention(self.heads, self.dtype, name="self_attn")(
            _layer_norm(self.eps, self.dtype, "layer_norm1")(x), keep
        )
        h = _layer_norm(self.eps, self.dtype, "layer_norm2")(x)
        h = _MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)
        return x + h


class _MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _activation(self.hidden_act, _dense(self.intermediate_size, self.dtype, "fc1")(x))
        return _dense(x.shape[-1], self.dtype, "fc2")(h)


class _Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        embed = lambda n, name: nn.Embed(
            n, self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        positions = jnp.arange(input_ids.shape[1])
        return (
            embed(self.vocab_size, "token_embedding")(input_ids)
            + embed(self.max_position_embeddings, "position_embedding")(positions)[None]
        )


class _Encoder(nn.Module):
    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array, keep: Array) -> list[Array]:
        states = [h]
        for i in range(self.num_layers):
            layer = CLIPEncoderLayer(
                self.heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype, name=f"layers_{i}"
            )
            states.append(layer(states[-1], keep))
        return states


class _TextTransformer(nn.Module):
    """transformers' CLIPTextModel body (`text_model.` in the checkpoints): the hidden states and
    their final_layer_norm."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None) -> tuple[list[Array], list[Array]]:
        h = _Embeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, self.dtype, name="embeddings"
        )(input_ids)
        length = input_ids.shape[1]
        keep = jnp.tril(jnp.ones((length, length), bool))[None]
        if attention_mask is not None:
            keep = keep & (jnp.asarray(attention_mask) > 0)[:, None, :]
        states = _Encoder(
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_act,
            self.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(h, keep)
        final = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")
        return states, [final(s) for s in states]


class CLIPTextEncoder(nn.Module):
    """transformers CLIPTextModel (projection_dim None) or CLIPTextModelWithProjection.

    input_ids (B, L) int with L <= max_position_embeddings, attention_mask (B, L) keep (1 =
    token, 0 = padding) or None -> CLIPTextOutput. dtype: compute dtype name ("float32" |
    "bfloat16"); params are float32. use_attention_mask only records the config's switch (diffusers
    passes the tokenizer's mask when it is set); the module uses whatever mask it is given.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None
    use_attention_mask: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"CLIPTextEncoder: hidden_act {self.hidden_act!r} not in {HIDDEN_ACTS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextEncoder: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIPTextEncoder: eos_token_id must be one int, got {self.eos_token_id!r}")
        compute_dtype(self.dtype)

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextEncoder: input_ids must be (B, L), got shape {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"CLIPTextEncoder: {input_ids.shape[1]} tokens > max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        if attention_mask is not None and jnp.shape(attention_mask) != input_ids.shape:
            raise ValueError(
                f"CLIPTextEncoder: attention_mask shape {jnp.shape(attention_mask)} != input_ids "
                f"shape {input_ids.shape}"
            )
        dtype = compute_dtype(self.dtype)
        states, normed = _TextTransformer(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.max_position_embeddings,
            self.hidden_act,
            self.layer_norm_eps,
            dtype,
            name="text_model",
        )(input_ids, attention_mask)
        last = normed[-1]
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            index = jnp.argmax(input_ids, axis=-1)
        else:  # the first eos (padding may repeat it); a row without one pools token 0, as torch
            index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if self.projection_dim is not None:
            text_embeds = _dense(self.projection_dim, dtype, "text_projection", False)(pooled)
        return CLIPTextOutput(last, pooled, tuple(states), tuple(normed), text_embeds)


# ---- the pipelines' text conditioning -----------------------------------------------------------
def sd_text_states(outputs: CLIPTextOutput, clip_skip: int | None = None) -> Array:
    """(B, L, D) prompt_embeds of diffusers' StableDiffusionPipeline.encode_prompt (0.42):
    last_hidden_state, or with clip_skip final_layer_norm(hidden_states[-(clip_skip + 1)]).

    diffusers applies clip_skip to the prompt only: its negative prompt's embeddings are the
    last_hidden_state (call with clip_skip=None for them).
    """
    if clip_skip is None:
        return outputs.last_hidden_state
    _check_skip(clip_skip, len(outputs.hidden_states), 1)
    return outputs.normed_hidden_states[-(clip_skip + 1)]


def sdxl_text_states(
    out1: CLIPTextOutput | None, out2: CLIPTextOutput, clip_skip: int | None = None
) -> tuple[Array, Array]:
    """(prompt_embeds (B, L, D1 + D2), pooled (B, P)) of diffusers'
    StableDiffusionXLPipeline.encode_prompt (0.42).

    prompt_embeds: concat over the features of each encoder's hidden_states[-2] (not normed), or
    hidden_states[-(clip_skip + 2)] with clip_skip; out1 None (the refiner, text_encoder_2 only)
    gives encoder 2's alone. pooled: text_embeds of encoder 2 (a CLIPTextModelWithProjection).
    diffusers' negative prompt ignores clip_skip (call with clip_skip=None for it).
    """
    if out2.text_embeds is None:
        raise ValueError("sdxl_text_states: encoder 2 has no text_projection (CLIPTextModelWithProjection)")
    index = -2 if clip_skip is None else -(clip_skip + 2)
    outs = [o for o in (out1, out2) if o is not None]
    if clip_skip is not None:
        for o in outs:
            _check_skip(clip_skip, len(o.hidden_states), 2)
    return jnp.concatenate([o.hidden_states[index] for o in outs], axis=-1), out2.text_embeds


def _check_skip(clip_skip: int, num_states: int, offset: int) -> None:
    if not 0 <= clip_skip <= num_states - offset:
        raise UserError(
            f"clip_skip={clip_skip} must be in [0, {num_states - offset}] for a text encoder of "
            f"{num_states - 1} layers"
        )


# ---- config and weights -------------------------------------------------------------------------
def clip_text_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    with_projection: bool | None = None,
    what: str = "text_encoder/config.json (CLIPTextModel)",
) -> CLIPTextEncoder:
    """The module a transformers CLIPTextConfig `config.json` describes.

    `architectures` picks CLIPTextModel / CLIPTextModelWithProjection (`with_projection`, when
    given, overrides it). An unknown option, or an option at a value this twin does not
    implement, is a UserError naming it and `what`.
    """
    if with_projection is None:
        archs = config.get("architectures") or ["CLIPTextModel"]
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown or len(archs) != 1:
            raise UserError(
                f"{what}: architectures={archs!r} is not supported (one of {list(ARCHITECTURES)})"
            )
        with_projection = archs[0] == "CLIPTextModelWithProjection"
    opts = read_options(config, DEFAULTS, what=what, fixed=FIXED, ignored=IGNORED)
    if not with_projection:
        opts["projection_dim"] = None
    try:
        return CLIPTextEncoder(**opts, dtype=_dtype_name(dtype))
    except (TypeError, ValueError) as err:
        raise UserError(f"{what}: {err}") from None


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"text encoder compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def param_shapes(module: CLIPTextEncoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), ids))


def params_from_state_dict(
    module: CLIPTextEncoder, state: Mapping[str, Any], *, what: str = "state dict"
) -> dict[str, Any]:
    """Flax params of `module` from a torch state dict in either spelling: the checkpoints'
    (`text_model.` prefix) or transformers 5's plain CLIPTextModel (no prefix). The position_ids
    buffer some checkpoints carry is dropped (transformers ignores it too). A missing, unexpected
    or mis-shaped key is a UserError naming it in the state dict's own spelling."""
    prefixed = any(k.startswith(PREFIX) for k in state)
    canon = {}
    for key, value in state.items():
        if key.removeprefix(PREFIX) == POSITION_IDS_KEY:
            continue
        canon[key if prefixed or key == "text_projection.weight" else PREFIX + key] = value
    try:
        return params_from_torch(canon, param_shapes(module), CLIP_LIST_NAMES, what=what)
    except ValueError as err:
        message = str(err) if prefixed else str(err).replace(f"'{PREFIX}", "'")
        raise UserError(message) from None


def load_clip_text_encoder(
    folder: str, dtype: Any = "float32", *, variant: str | None = None
) -> tuple[CLIPTextEncoder, dict[str, Any]]:
    """(module, params) of a text_encoder/ folder (transformers config.json + safetensors).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype. An
    unknown config option, a missing file, or a missing / unexpected / mis-shaped key is a
    UserError naming it.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path)
    state = load_component_weights(folder, variant)
    # a config without `architectures` is told by its weights
    with_projection = None if config.get("architectures") else "text_projection.weight" in state
    name = ARCHITECTURES[1] if with_projection else (config.get("architectures") or ARCHITECTURES[:1])[0]
    module = clip_text_from_config(
        config, dtype=dtype, with_projection=with_projection, what=f"{config_path} ({name})"
    )
    return module, params_from_state_dict(module, state, what=weights_file(folder, variant))


def clip_text_to_torch(params: Any, *, text_model_prefix: bool = True) -> dict[str, np.ndarray]:
    """Flax CLIP text params -> {torch key: float32 numpy array in torch layout}.

    Keys in the checkpoints' spelling (`text_model.encoder...`, `text_projection.weight`), which
    `CLIPTextModel.from_pretrained` and CLIPTextModelWithProjection's state dict take;
    text_model_prefix=False drops the prefix, for transformers 5's `CLIPTextModel.load_state_dict`.
    """
    state = params_to_torch(params, CLIP_LIST_NAMES)
    if text_model_prefix:
        return state
    return {k.removeprefix(PREFIX): v for k, v in state.items()}
