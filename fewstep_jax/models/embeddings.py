"""Time and conditioning embeddings shared by every network.

Layout and formulas follow diffusers (`Timesteps`, `TimestepEmbedding`, LCM's
`get_guidance_scale_embedding`) so that a UNet's params map 1:1 onto diffusers' keys.

The conditioning vector of a model is
    emb = time_embedding(sin(t * time_scale), cond=guidance_proj_input)     # diffusers layout
        + s_embedding(sin(s * time_scale))       # flow-map students, last layer zero-initialised
        + class_embedding[label]                 # label -1 -> null row `num_classes`
        + num_steps_embedding[num_steps]         # steps-aware students, zero-initialised
Every term that a teacher lacks is zero at initialisation, so teacher params copied into a
student (see `init_student_from_teacher`) give the teacher's output exactly.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Dtype:
    """Map a config `dtype` string ("float32" | "bfloat16") to a jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def timestep_embedding(
    timesteps: Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding of diffusers' `get_timestep_embedding`: (B,) -> (B, dim) float32.

    Frequencies exp(-log(max_period) * k / (dim/2 - freq_shift)), k < dim/2; output [sin, cos]
    ([cos, sin] if flip_sin_to_cos); an odd dim is zero-padded by one column.
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_scale_embedding(w: Array, dim: int) -> Array:
    """LCM's `get_guidance_scale_embedding`: sinusoidal [sin, cos] of w * 1000, (B,) -> (B, dim)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance must have shape (B,), got {w.shape}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    args = (w * 1000.0)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2, (B, in) -> (B, features).

    `cond` (B, cond_dim), when given, goes through the bias-free `cond_proj` (zero-initialised)
    and is added to the input, as diffusers does for LCM's `timestep_cond`.
    `zero_init_last` zero-initialises linear_2 so the branch starts as the zero function.
    """

    features: int
    zero_init_last: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: Array, cond: Array | None = None) -> Array:
        if cond is not None:
            sample = sample + nn.Dense(
                sample.shape[-1],
                use_bias=False,
                kernel_init=nn.initializers.zeros,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="cond_proj",
            )(cond)
        h = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(sample)
        h = nn.silu(h)
        last_init = nn.initializers.zeros if self.zero_init_last else nn.linear.default_kernel_init
        return nn.Dense(
            self.features,
            kernel_init=last_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="linear_2",
        )(h)


def _per_sample(value: Any, batch: int, dtype: Dtype, what: str) -> Array:
    """Broadcast a scalar or (B,) value to shape (B,); anything else is a ValueError."""
    arr = jnp.asarray(value, dtype)
    if arr.ndim == 0:
        return jnp.broadcast_to(arr, (batch,))
    if arr.shape != (batch,):
        raise ValueError(f"{what} must be a scalar or have shape ({batch},), got {arr.shape}")
    return arr


def conditioning_embedding(
    batch: int,
    t: Array,
    s: Array | None,
    label: Array | None,
    guidance: Array | None,
    num_steps: Array | None,
    *,
    freq_dim: int,
    embed_dim: int,
    time_scale: float,
    num_classes: int,
    use_s: bool,
    use_guidance: bool,
    guidance_embed_dim: int,
    num_step_classes: int,
    dtype: Dtype,
) -> Array:
    """Build the (B, embed_dim) conditioning vector; call inside a parent's `nn.compact`.

    The submodules are created in the caller's scope, so their params sit at the caller's top
    level (`time_embedding`, `class_embedding`, ...), as in diffusers' UNet2DModel.

    Missing inputs of a configured branch take a neutral value so that `init` creates every
    param: s -> t (G(x, t, t)), label -> null class, guidance -> 0, num_steps -> 0. Inputs for
    a branch the config does not have are a ValueError.
    """
    if s is not None and not use_s:
        raise ValueError("got `s` but the model config has use_s=False")
    if label is not None and num_classes <= 0:
        raise ValueError("got `label` but the model config has num_classes=0")
    if guidance is not None and not use_guidance:
        raise ValueError("got `guidance` but the model config has use_guidance=False")
    if num_steps is not None and num_step_classes <= 0:
        raise ValueError("got `num_steps` but the model config has num_step_classes=0")

    t = _per_sample(t, batch, jnp.float32, "t")
    cond = None
    if use_guidance:
        w = _per_sample(0.0 if guidance is None else guidance, batch, jnp.float32, "guidance")
        cond = guidance_scale_embedding(w, guidance_embed_dim).astype(dtype)
    t_freq = timestep_embedding(t * time_scale, freq_dim).astype(dtype)
    emb = TimestepEmbedding(embed_dim, dtype=dtype, name="time_embedding")(t_freq, cond)

    if use_s:
        s = t if s is None else _per_sample(s, batch, jnp.float32, "s")
        s_freq = timestep_embedding(s * time_scale, freq_dim).astype(dtype)
        emb = emb + TimestepEmbedding(embed_dim, zero_init_last=True, dtype=dtype, name="s_embedding")(s_freq)

    if num_classes > 0:
        # Row `num_classes` is the null (unconditional) class; label -1 selects it.
        lab = _per_sample(-1 if label is None else label, batch, jnp.int32, "label")
        lab = jnp.where(lab < 0, num_classes, lab)
        emb = emb + nn.Embed(
            num_classes + 1,
            embed_dim,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(1.0),
            name="class_embedding",
        )(lab)

    if num_step_classes > 0:
        idx = _per_sample(0 if num_steps is None else num_steps, batch, jnp.int32, "num_steps")
        emb = emb + nn.Embed(
            num_step_classes,
            embed_dim,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.zeros,
            name="num_steps_embedding",
        )(idx)
    return emb
