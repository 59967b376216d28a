"""Encode a prompt (or image-text) source once with a loaded pipeline into a cache on disk.

`write_latent_cache(pipe, source, cache_dir)` encodes this process's rows of a
`data.prompt_sources.TextSource` in fixed-size batches (the last one padded: one compilation per
encoder) with `encode_prompts`, every key it returns stored per row, the null condition once, and,
for image-text sources, the VAE latents `(z - shift_factor) * scaling_factor` of each image with
z the encoder posterior's mean (latents="mean") or a sample of it (latents="sample", drawn with
`fold_in(key(seed), row)`: the same whatever the batch size or process count). The format, its
atomic writing and the reader are data/latent_cache.py's; docs/guides/latent_models.md ("Prompt
and latent caches") shows the calls.

`cache_fingerprint` is what a cache is refused as stale against: the pipeline's class, family and
compute dtype, the sha256 of its text encoders' and tokenizers' folders, model_index.json and the
denoiser's config.json (its sample_size sets the default size conditions), of the VAE folder when
there are latents, the source's identity (a prompt file's sha256, a TFDS split's name / version /
size) and the encoding options. Hashing reads every weight file once per process (memoised).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.data.images import uint8_to_unit
from fewstep_jax.data.latent_cache import (
    LATENTS,
    LatentCache,
    files_digest,
    open_latent_cache,
    part_rows,
    write_cache_part,
)
from fewstep_jax.data.prompt_sources import TextSource
from fewstep_jax.errors import UserError
from fewstep_jax.pipelines.folder import MODEL_INDEX, LatentPipeline
from fewstep_jax.pipelines.prompts import encode_prompts

LATENT_MODES = ("mean", "sample")


def _latent_mode(latents: str | None, source: TextSource) -> str | None:
    """ "auto": "mean" for an image-text source, None (prompts only) otherwise."""
    if latents == "auto":
        return "mean" if source.has_images else None
    if latents is None:
        return None
    if latents not in LATENT_MODES:
        raise UserError(f"latents must be one of {list(LATENT_MODES)}, 'auto' or None, got {latents!r}")
    if not source.has_images:
        raise UserError(f"latents={latents!r} needs an image-text source (record_source(..., image_key=...))")
    return latents


def _image_size(
    pipe: LatentPipeline, source: TextSource, mode: str | None, image_size: Any
) -> tuple[int, int] | None:
    """The size conditions' (H, W): as given, else the images' (row 0), else None (the family's
    default)."""
    if image_size is not None:
        return (int(image_size[0]), int(image_size[1]))
    if mode is None:
        return None
    _, images = source.read(0, 1)
    h, w = images.shape[1:3]
    f = pipe.vae_scale_factor
    if h % f or w % f:
        raise UserError(
            f"images of {h} x {w} pixels do not divide into latents of {f} x {f} pixels (resize them)"
        )
    return (int(h), int(w))


def cache_fingerprint(
    pipe: LatentPipeline,
    source: TextSource,
    *,
    latents: str | None = "auto",
    negative_prompt: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """What a cache of `source` encoded by `pipe` with these options is computed from (module
    docstring); `write_latent_cache` records it, `open_pipeline_cache` compares it."""
    mode = _latent_mode(latents, source)
    text = sorted(k for k in pipe.index if k.startswith(("text_encoder", "tokenizer")))
    return {
        "pipeline_class": pipe.pipeline_class,
        "family": pipe.family,
        "dtype": pipe.dtype,
        "text_sha256": files_digest(
            pipe.folder, [*text, MODEL_INDEX, os.path.join(pipe.spec.denoiser, "config.json")]
        ),
        "vae_sha256": files_digest(pipe.folder, ["vae"]) if mode else None,
        "source": dict(source.identity),
        "options": {
            "latents": mode,
            "seed": int(seed) if mode == "sample" else None,
            "negative_prompt": negative_prompt,
            "image_size": list(_image_size(pipe, source, mode, image_size) or []) or None,
            "max_sequence_length": max_sequence_length,
            "clip_skip": clip_skip,
        },
    }


@functools.cache
def _image_encoder(vae: Any, sample: bool) -> Any:
    """jit((params, images (B, H, W, C) in [-1, 1], rows (B,), seed) -> latents (B, h, w, C))."""
    from fewstep_jax.models.vae import encode, latents_from_moments, to_latents

    def fn(params: Any, x: jax.Array, rows: jax.Array, seed: jax.Array) -> jax.Array:
        mean, logvar = encode(vae, {"params": params}, x)
        if not sample:
            return to_latents(vae, mean)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows)
        one = lambda m, lv, k: latents_from_moments(m[None], lv[None], k)[0]
        return to_latents(vae, jax.vmap(one)(mean, logvar, keys))

    return jax.jit(fn)


def encode_images(
    pipe: LatentPipeline, images: np.ndarray, rows: np.ndarray, mode: str = "mean", seed: int = 0
) -> np.ndarray:
    """uint8 images (B, H, W, C) -> the denoiser's latents (B, H / f, W / f, latent channels)
    float32: the VAE posterior's mean (or, mode "sample", a draw keyed by `rows` (B,), the rows'
    global indices), times scaling_factor after subtracting shift_factor."""
    x = jnp.asarray(uint8_to_unit(images))
    fn = _image_encoder(pipe.vae.module, mode == "sample")
    return np.asarray(
        fn(pipe.vae.params, x, jnp.asarray(rows, jnp.int32), jnp.asarray(seed, jnp.uint32)), np.float32
    )


def write_latent_cache(
    pipe: LatentPipeline,
    source: TextSource,
    cache_dir: str | os.PathLike,
    *,
    latents: str | None = "auto",
    negative_prompt: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    process_index: int = 0,
    process_count: int = 1,
) -> bool:
    """Encodes this process's rows of `source` into `cache_dir` (False: that part was already
    written by the same inputs, nothing is encoded). Every process calls it with its index; the
    cache opens once all have finished.

    latents: "auto" (the image-text source's posterior means; none for prompts only), "mean",
      "sample" (a posterior draw keyed by `seed` and the row), or None.
    negative_prompt: the null condition's text (None: the family's default, "" or SDXL's zeros).
    image_size: (H, W) of the size conditions (SDXL time_ids, PixArt-alpha resolution); default
      the images' size, else the family's default. max_sequence_length, clip_skip: encode_prompts'.
    batch_size: rows per encoder call.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise UserError("negative_prompt: one string (the null condition is stored once for every row)")
    mode = _latent_mode(latents, source)
    size = _image_size(pipe, source, mode, image_size)
    options = {"image_size": size, "max_sequence_length": max_sequence_length, "clip_skip": clip_skip}
    fingerprint = cache_fingerprint(
        pipe, source, latents=mode, negative_prompt=negative_prompt, seed=seed, **options
    )
    start, stop = part_rows(source.num_rows, process_index, process_count)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            texts, images = source.read(lo, hi)
            if len(texts) != hi - lo:
                raise UserError(f"the source gave {len(texts)} texts for rows [{lo}, {hi})")
            pad = batch_size - (hi - lo)  # a full batch every call: one compilation
            cond, _ = encode_prompts(pipe, [*texts, *[""] * pad], negative_prompt, **options)
            rows = {k: np.asarray(v)[: hi - lo] for k, v in cond.items()}
            if mode is not None:
                if images is None or images.shape[0] != hi - lo:
                    raise UserError(f"the source gave no images or a wrong count for rows [{lo}, {hi})")
                if tuple(images.shape[1:3]) != size:
                    raise UserError(
                        f"rows [{lo}, {hi}) hold {images.shape[1:3]} images, row 0 {size}: one size for all"
                    )
                padded = np.concatenate([images, np.repeat(images[:1], pad, axis=0)]) if pad else images
                index = np.arange(lo, lo + batch_size)
                rows[LATENTS] = encode_images(pipe, padded, index, mode, seed)[: hi - lo]
            yield rows

    null = None
    if process_index == 0:
        # a batch of batch_size rows, as the rows': no other compilation for one row
        _, null_cond = encode_prompts(pipe, [""] * batch_size, negative_prompt, **options)
        null = {k: np.asarray(v)[:1] for k, v in null_cond.items()}
    return write_cache_part(
        cache_dir,
        fingerprint,
        source.num_rows,
        batches(),
        null,
        process_index=process_index,
        process_count=process_count,
        info={"pipeline_folder": os.path.abspath(pipe.folder), "batch_size": int(batch_size)},
    )


def open_pipeline_cache(
    pipe: LatentPipeline, source: TextSource, cache_dir: str | os.PathLike, **options: Any
) -> LatentCache:
    """The cache in `cache_dir`, refused as stale unless written from this pipeline's encoders,
    this source and these options (write_latent_cache's keywords, batch_size and process split
    excepted)."""
    return open_latent_cache(cache_dir, expect=cache_fingerprint(pipe, source, **options))


__all__ = ["LATENT_MODES", "cache_fingerprint", "encode_images", "open_pipeline_cache", "write_latent_cache"]
