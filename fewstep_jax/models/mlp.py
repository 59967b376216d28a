"""Residual MLP for low-dimensional data (B, D): teachers and students of the 2-D testbeds."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fewstep_jax.models.embeddings import Dtype, compute_dtype, conditioning_embedding

Array = jax.Array


def mlp_config() -> ml_collections.ConfigDict:
    """Default MLP config (about 0.7M params for D=2), the model of the 2-D toy runs."""
    return ml_collections.ConfigDict(
        {
            "name": "mlp",
            "width": 256,
            "num_layers": 4,
            "emb_dim": 128,
            "time_scale": 1000.0,
            "num_classes": 0,
            "use_s": False,
            "use_guidance": False,
            "guidance_embed_dim": 256,
            "num_step_classes": 0,
            "dropout": 0.0,
            "dtype": "float32",
        }
    )


class ResidualBlock(nn.Module):
    """x + dense2(dropout(SiLU(LN(dense1(SiLU(LN(x))) + emb_proj(SiLU(emb)))))), (B, W)."""

    width: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        dense = lambda name: nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm1")(x))
        h = dense("dense1")(h) + dense("emb_proj")(nn.silu(emb))
        h = nn.silu(nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + dense("dense2")(h)


class MLP(nn.Module):
    """Conditional residual MLP, (B, D) -> (B, D).

    input_proj -> `num_layers` ResidualBlocks (`blocks_i`) -> LayerNorm/SiLU -> output Dense.
    The conditioning vector (see `embeddings.conditioning_embedding`) has width `emb_dim`, from
    an `emb_dim`-wide sinusoidal embedding of t * time_scale.
    The output Dense is zero-initialised: a fresh network is the zero function, which is a
    neutral first guess for every prediction type (velocity / noise / flow-map increment, so a
    fresh Euler-form student G = x + (s - t) u starts as the identity), and the final layer still
    receives gradient at step 0, so training is not stalled. Config fields are the attributes.
    """

    width: int = 256
    num_layers: int = 4
    emb_dim: int = 128
    time_scale: float = 1000.0
    num_classes: int = 0
    use_s: bool = False
    use_guidance: bool = False
    guidance_embed_dim: int = 256
    num_step_classes: int = 0
    dropout: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        s: Array | None = None,
        label: Array | None = None,
        guidance: Array | None = None,
        num_steps: Array | None = None,
        train: bool = False,
    ) -> Array:
        """x (B, D), t scalar or (B,) in [0, 1] -> (B, D) float32."""
        if x.ndim != 2:
            raise ValueError(f"MLP expects x of shape (B, D), got {x.shape}")
        dtype = compute_dtype(self.dtype)
        emb = conditioning_embedding(
            x.shape[0],
            t,
            s,
            label,
            guidance,
            num_steps,
            freq_dim=self.emb_dim,
            embed_dim=self.emb_dim,
            time_scale=self.time_scale,
            num_classes=self.num_classes,
            use_s=self.use_s,
            use_guidance=self.use_guidance,
            guidance_embed_dim=self.guidance_embed_dim,
            num_step_classes=self.num_step_classes,
            dtype=dtype,
        )
        h = nn.Dense(self.width, dtype=dtype, param_dtype=jnp.float32, name="input_proj")(x.astype(dtype))
        for i in range(self.num_layers):
            h = ResidualBlock(self.width, self.dropout, dtype, name=f"blocks_{i}")(h, emb, train)
        h = nn.silu(nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name="norm_out")(h))
        out = nn.Dense(
            x.shape[-1],
            kernel_init=nn.initializers.zeros,
            dtype=dtype,
            param_dtype=jnp.float32,
            name="output_proj",
        )(h)
        return out.astype(jnp.float32)
