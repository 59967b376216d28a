"""Patch embedding of the latent transformers (PixArt, SD3) and its inverse, NHWC.

Twin of diffusers 0.42 `embeddings.PatchEmbed` (pos_embed_type "sincos" or None) and
`get_2d_sincos_pos_embed`:
  tokens = proj(x)  (conv, kernel = stride = patch_size)  -> flatten row-major over (h, w)
           [-> LayerNorm(eps 1e-6, no affine) if layer_norm] + pos_embed
Two positional embedding behaviours:
  * PixArt (`pos_embed_max_size` None): the 2D sin-cos table of the input's (h, w) patch grid,
    positions scaled by base_size / grid and 1 / interpolation_scale (base_size = height // p);
    a constant, not a param (diffusers' non-persistent buffer), recomputed for any input size.
  * SD3 (`pos_embed_max_size` M): a (1, M*M, D) table, a param named `pos_embed` because
    diffusers saves it in the checkpoint (persistent buffer `pos_embed.pos_embed`), initialised
    to the sin-cos table of the M x M grid; the centre (h, w) crop of it is added.
Params: `proj/kernel` (p, p, C, D) <-> `proj.weight` (D, C, p, p), `proj/bias`, [`pos_embed`].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.models.embeddings import Dtype
from fewstep_jax.models.layers import conv

Array = jax.Array
POS_EMBED_TYPES = ("sincos", None)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin, cos] of pos * 10000^(-k / (dim/2)), k < dim/2: (M,) -> (M, dim) float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(
    embed_dim: int, grid: tuple[int, int], base_size: float, interpolation_scale: float = 1.0
) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed(embed_dim, grid, base_size=, interpolation_scale=)`:
    (gh * gw, embed_dim) float32, tokens row-major over (h, w).

    Position of row i is i / (gh / base_size) / interpolation_scale (float32 arithmetic, as
    torch does it); the first embed_dim / 2 channels encode the column, the rest the row.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos positional embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid
    f32 = np.float32
    pos_h = np.arange(gh, dtype=f32) / f32(gh / base_size) / f32(interpolation_scale)
    pos_w = np.arange(gw, dtype=f32) / f32(gw / base_size) / f32(interpolation_scale)
    cols, rows = np.meshgrid(pos_w, pos_h, indexing="xy")  # (gh, gw) each
    emb = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def unpatchify(tokens: Array, grid: tuple[int, int], patch_size: int) -> Array:
    """Tokens (B, h * w, p * p * C), each token's channels ordered (p_row, p_col, C), -> image
    (B, h * p, w * p, C) NHWC: the inverse of the patch layout diffusers' transformers use."""
    b, n, f = tokens.shape
    h, w = grid
    p = patch_size
    if n != h * w or f % (p * p):
        raise ValueError(f"unpatchify: tokens {tokens.shape} do not fit grid {grid} with patch {p}")
    c = f // (p * p)
    x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed` on NHWC input: x (B, H, W, C) -> tokens (B, H/p * W/p, embed_dim).

    height / width: the configured sample size in pixels of x (base_size = height // p; with
    pos_embed_max_size the crop needs H/p, W/p <= pos_embed_max_size). H and W must be
    divisible by patch_size. The conv has a bias (both PixArt and SD3 use one).
    """

    height: int = 224
    width: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    layer_norm: bool = False
    interpolation_scale: float = 1.0
    pos_embed_type: str | None = "sincos"
    pos_embed_max_size: int | None = None
    dtype: Dtype = jnp.float32

    @property
    def base_size(self) -> int:
        return self.height // self.patch_size

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"PatchEmbed: pos_embed_type {self.pos_embed_type!r} not in {POS_EMBED_TYPES}")
        b, hgt, wid, _ = x.shape
        p = self.patch_size
        if hgt % p or wid % p:
            raise ValueError(f"PatchEmbed: input size {(hgt, wid)} must be divisible by patch_size {p}")
        gh, gw = hgt // p, wid // p
        h = conv(self.embed_dim, self.dtype, "proj", kernel=p, stride=p, pad=0)(x.astype(self.dtype))
        h = h.reshape(b, gh * gw, self.embed_dim)
        if self.layer_norm:
            h = nn.LayerNorm(
                epsilon=1e-6,
                use_bias=False,
                use_scale=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="norm",
            )(h)
        if self.pos_embed_type is None:
            return h
        if self.pos_embed_max_size:
            pos = self._cropped(gh, gw)
        else:
            pos = jnp.asarray(
                sincos_pos_embed_2d(self.embed_dim, (gh, gw), self.base_size, self.interpolation_scale)
            )
        # diffusers adds the float32 table, then casts back to the compute dtype
        return (h.astype(jnp.float32) + pos[None]).astype(self.dtype)

    def _cropped(self, gh: int, gw: int) -> Array:
        """The centre (gh, gw) crop of the (M*M, D) table param, (gh * gw, D) float32."""
        m = self.pos_embed_max_size
        if gh > m or gw > m:
            raise ValueError(
                f"PatchEmbed: patch grid {(gh, gw)} is larger than pos_embed_max_size {m} "
                f"(input at most {m * self.patch_size} pixels a side)"
            )
        table = self.param(
            "pos_embed",
            lambda _key, shape: jnp.asarray(
                sincos_pos_embed_2d(self.embed_dim, (m, m), self.base_size, self.interpolation_scale)
            ).reshape(shape),
            (1, m * m, self.embed_dim),
        )
        top, left = (m - gh) // 2, (m - gw) // 2
        crop = table.reshape(m, m, self.embed_dim)[top : top + gh, left : left + gw]
        return crop.reshape(gh * gw, self.embed_dim)
