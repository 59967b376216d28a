"""SD3Transformer2D: a Flax Linen twin of diffusers' `SD3Transformer2DModel` (Stable Diffusion 3
medium, SD3.5 large / medium), NHWC, params named like its keys.

Architecture (diffusers 0.42 `transformers/transformer_sd3.py`; the blocks and norms are in
models/mmdit.py), D = num_attention_heads * attention_head_dim:
  tokens = pos_embed(x)          patch conv + the centre crop of the checkpoint's
                                 (pos_embed_max_size^2, D) table (models/patch_embed.py)
  temb   = time_text_embed(t, pooled)       timestep_embedder(sin(t)) + text_embedder(pooled)
  ctx    = context_embedder(encoder_hidden_states)      Linear joint_attention_dim -> D
  blocks: JointTransformerBlock x num_layers; the last is context_pre_only (no text output);
          blocks listed in dual_attention_layers (SD3.5 medium) add attn2 on the image stream;
          qk_norm "rms_norm" (SD3.5) normalises q / k of both streams per head
  out    = proj_out(norm_out(h, temb))       AdaLayerNormContinuous, no affine, eps 1e-6
  -> unpatchify -> (B, H, W, out_channels).
timestep is diffusers' value, the flow-matching sigma x 1000 (0..1000).

Not supported: diffusers' forward extras `skip_layers` (skip-layer guidance),
`block_controlnet_hidden_states` (ControlNet residuals), IP-adapter image embeddings
(`joint_attention_kwargs`), LoRA scales.

Param paths map 1:1 onto diffusers keys by `state_dict.torch_key` with `SD3_LIST_NAMES`:
`transformer_blocks_0/attn/to_out_0/kernel` <-> `transformer_blocks.0.attn.to_out.0.weight`,
`pos_embed/pos_embed` <-> `pos_embed.pos_embed` (the table is a checkpoint tensor).

Use: `module, params = load_sd3_transformer("stable-diffusion-3-medium/transformer")`, then
`module.apply({"params": params}, latents_nhwc, timestep, t5_clip_states, pooled_clip)`.
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
from fewstep_jax.models.embeddings import DTYPES, compute_dtype
from fewstep_jax.models.hf_config import read_options
from fewstep_jax.models.mmdit import (
    MMDIT_LIST_NAMES,
    QK_NORMS,
    AdaLayerNormContinuous,
    CombinedTimestepTextProjEmbeddings,
    JointTransformerBlock,
)
from fewstep_jax.models.patch_embed import PatchEmbed, unpatchify
from fewstep_jax.models.state_dict import abstract_param_shapes, params_from_torch, params_to_torch

Array = jax.Array

SD3_LIST_NAMES = MMDIT_LIST_NAMES

# config.json options this twin implements, with diffusers' defaults (every option of
# SD3Transformer2DModel's config is implemented; none is fixed or ignored)
DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}


class SD3Transformer2D(nn.Module):
    """diffusers-compatible SD3Transformer2DModel, NHWC (B, H, W, in_channels) -> (B, H, W,
    out_channels).

    Fields are diffusers' config options (see `DEFAULTS`; dual_attention_layers a tuple), plus
    `dtype` (the compute dtype, "float32" | "bfloat16"; params stay float32) and `remat`
    (rematerialise each transformer block in the backward pass).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        validate_sd3(self)
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @nn.compact
    def __call__(
        self, sample: Array, timestep: Array, encoder_hidden_states: Array, pooled_projections: Array
    ) -> Array:
        """sample (B, H, W, in_channels) latents, H and W divisible by patch_size and at most
        patch_size * pos_embed_max_size; timestep scalar or (B,) in diffusers' units (sigma x 1000);
        encoder_hidden_states (B, L, joint_attention_dim) (CLIP-L/G + T5 states);
        pooled_projections (B, pooled_projection_dim) (pooled CLIP-L + G) -> (B, H, W,
        out_channels) float32.
        """
        dtype = compute_dtype(self.dtype)
        d, p = self.inner_dim, self.patch_size
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"SD3Transformer2D expects sample of shape (B, H, W, {self.in_channels}), got {sample.shape}"
            )
        b, hgt, wid, _ = sample.shape
        ctx_shape = encoder_hidden_states.shape
        if len(ctx_shape) != 3 or (ctx_shape[0], ctx_shape[2]) != (b, self.joint_attention_dim):
            raise ValueError(
                f"encoder_hidden_states must have shape ({b}, L, {self.joint_attention_dim}), "
                f"got {encoder_hidden_states.shape}"
            )
        if pooled_projections.shape != (b, self.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must have shape ({b}, {self.pooled_projection_dim}), "
                f"got {pooled_projections.shape}"
            )
        t = jnp.asarray(timestep, jnp.float32)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"timestep must be a scalar or have shape ({b},), got {t.shape}")

        h = PatchEmbed(
            height=self.sample_size,
            width=self.sample_size,
            patch_size=p,
            embed_dim=d,
            pos_embed_max_size=self.pos_embed_max_size,
            dtype=dtype,
            name="pos_embed",
        )(sample)
        temb = CombinedTimestepTextProjEmbeddings(d, dtype, name="time_text_embed")(t, pooled_projections)
        context = nn.Dense(
            self.caption_projection_dim, dtype=dtype, param_dtype=jnp.float32, name="context_embedder"
        )(encoder_hidden_states.astype(dtype))

        block_cls = nn.remat(JointTransformerBlock) if self.remat else JointTransformerBlock
        for i in range(self.num_layers):
            h, context = block_cls(
                self.num_attention_heads,
                self.attention_head_dim,
                context_pre_only=i == self.num_layers - 1,
                qk_norm=self.qk_norm,
                use_dual_attention=i in self.dual_attention_layers,
                dtype=dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, temb)

        h = AdaLayerNormContinuous(dtype, name="norm_out")(h, temb)
        h = nn.Dense(p * p * self.output_channels, dtype=dtype, param_dtype=jnp.float32, name="proj_out")(h)
        return unpatchify(h, (hgt // p, wid // p), p).astype(jnp.float32)


def validate_sd3(m: Any) -> None:
    """ValueError naming the field when a config cannot build a valid network (or one this twin
    does not implement)."""
    d = m.num_attention_heads * m.attention_head_dim
    if m.caption_projection_dim != d:
        raise ValueError(
            f"SD3Transformer2D: caption_projection_dim {m.caption_projection_dim} must equal "
            f"num_attention_heads * attention_head_dim = {d} (the text stream of the joint blocks is "
            "that wide)"
        )
    if d % 4:
        raise ValueError(
            f"SD3Transformer2D: num_attention_heads * attention_head_dim = {d} must be divisible by 4 "
            "(the 2D sin-cos positional embedding)"
        )
    if m.qk_norm not in QK_NORMS:
        raise ValueError(f"SD3Transformer2D: qk_norm {m.qk_norm!r} is not supported (only {QK_NORMS})")
    if m.num_layers < 1:
        raise ValueError(f"SD3Transformer2D: num_layers must be >= 1, got {m.num_layers}")
    if not isinstance(m.dual_attention_layers, tuple):
        raise ValueError(
            f"SD3Transformer2D: dual_attention_layers must be a tuple, got {m.dual_attention_layers!r}"
        )
    outside = [i for i in m.dual_attention_layers if not 0 <= i < m.num_layers]
    if outside:
        raise ValueError(
            f"SD3Transformer2D: dual_attention_layers {outside} are not blocks of num_layers={m.num_layers}"
        )
    compute_dtype(m.dtype)


# ---- config and weights ----------------------------------------------------------------------
def sd3_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = "float32",
    remat: bool = False,
    what: str = "transformer/config.json (SD3Transformer2DModel)",
) -> SD3Transformer2D:
    """The module a diffusers `transformer/config.json` describes; an unknown option, or an option
    at a value this twin does not implement, is a UserError naming it and the file."""
    opts = read_options(config, DEFAULTS, what=what)
    layers = opts["dual_attention_layers"]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
        raise UserError(f"{what}: dual_attention_layers must be a list of block indices, got {layers!r}")
    opts["dual_attention_layers"] = tuple(layers)
    try:
        return SD3Transformer2D(**opts, dtype=_dtype_name(dtype), remat=remat)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise UserError(f"SD3 compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def example_inputs(module: SD3Transformer2D, batch: int = 1, seq_len: int = 1) -> dict[str, Any]:
    """Smallest inputs that create every param of `module` (for init / eval_shape)."""
    p = module.patch_size
    return {
        "sample": jnp.zeros((batch, p, p, module.in_channels)),
        "timestep": jnp.zeros((batch,)),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, module.joint_attention_dim)),
        "pooled_projections": jnp.zeros((batch, module.pooled_projection_dim)),
    }


def param_shapes(module: SD3Transformer2D) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax param path: shape} of `module` (abstract: no compile, no allocation)."""
    return abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), **example_inputs(module)))


def load_sd3_transformer(
    folder: str, dtype: Any = "float32", *, variant: str | None = None, remat: bool = False
) -> tuple[SD3Transformer2D, dict[str, Any]]:
    """(module, params) of a diffusers SD3 / SD3.5 `transformer/` folder (config.json +
    safetensors, single or sharded, optional fp16/bf16 `variant`).

    Params are float32 (apply them as {"params": params}); `dtype` is the compute dtype. A
    missing / unexpected key or a mis-shaped tensor is a UserError naming the key and file.
    """
    from fewstep_jax.pipelines.weights import load_component_weights, read_json, weights_file

    config_path = os.path.join(folder, "config.json")
    module = sd3_from_config(
        read_json(config_path), dtype=dtype, remat=remat, what=f"{config_path} (SD3Transformer2DModel)"
    )
    state = load_component_weights(folder, variant)
    params = params_from_torch(
        state, param_shapes(module), SD3_LIST_NAMES, what=weights_file(folder, variant)
    )
    return module, params


def sd3_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Flax SD3Transformer2D params -> {diffusers key: float32 numpy array in torch layout}
    (loads into `SD3Transformer2DModel.load_state_dict(..., strict=True)`)."""
    return params_to_torch(params, SD3_LIST_NAMES)
