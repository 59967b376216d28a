"""Prompts -> the denoiser's conditioning, per family, as diffusers' `encode_prompt` computes it.

`encode_prompts(pipe, prompts, negative_prompts)` -> (cond, null_cond): two dicts of arrays with the
same keys and shapes (batch B = len(prompts)), the condition and the classifier-free-guidance
"unconditional" one. This dict is the condition the project passes to a latent teacher, and
`pipelines.folder.denoiser_apply` maps it onto each family's network call. Keys:
  "text_states"   (B, L, D) float32  the cross-attention context (PixArt: T5 last_hidden_state)
  "text_mask"     (B, L) int32       1 = token, 0 = padding (PixArt's prompt_attention_mask)
  "resolution"    (B, 2) float32     (height, width) of the image in pixels   } PixArt-alpha with
  "aspect_ratio"  (B, 1) float32     height / width                           } sample_size 128
SD (StableDiffusionPipeline) has "text_states" only (CLIP last_hidden_state; no mask). SDXL
(StableDiffusionXLPipeline) has no mask either, and:
  "text_states"   (B, 77, D1 + D2) float32  both CLIP encoders' hidden_states[-2], concatenated
  "pooled"        (B, P) float32     text_embeds of text_encoder_2 (its projection, P wide)
  "time_ids"      (B, 6) float32     original_size + crops_coords_top_left + target_size
SD3 (StableDiffusion3Pipeline) and Flux (FluxPipeline) have no mask either:
  "text_states"   SD3 (B, 77 + 256, J): the two CLIP hidden_states[-2] concatenated on the features,
                  zero-padded to T5's width J, then T5's states on the sequence axis;
                  Flux (B, 512, J): T5's last_hidden_state
  "pooled"        SD3 (B, P1 + P2): both CLIP text_embeds; Flux (B, D): CLIP's pooler_output
  "guidance"      (B,) float32       Flux with a guidance embedding (FLUX.1-dev): the guidance scale
Flux's txt_ids (zeros) and img_ids (the packed grid) are not condition keys: its denoiser call
derives them from the shapes.

PixArt (diffusers 0.42 `PixArtAlphaPipeline.encode_prompt`, Sigma's is the same at 300 tokens):
each text lower-cased and stripped (`_text_preprocessing` with clean_caption=False; the URL / HTML
cleaning of clean_caption=True is not done here), T5-tokenised to max_length (padding and
truncation, `</s>` at the end), encoded with the tokenizer's mask; the negative prompt (default
"") the same way at the same length. The size conditions are those of `__call__` (after any
resolution binning, which is the caller's: pass the final image size).

SD (diffusers 0.42 `StableDiffusionPipeline.encode_prompt`): texts as given (the CLIP tokenizer
lower-cases), padded / truncated to the tokenizer's model_max_length; the text encoder gets the
tokenizer's mask only when its config sets use_attention_mask; clip_skip applies to the prompt
(final_layer_norm of hidden_states[-(clip_skip + 1)]), not to the negative prompt, as there.
Textual-inversion tokens and LoRA scales are not handled.

SDXL (diffusers 0.42 `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`): the same
text to both tokenizers (no separate prompt_2 / negative_prompt_2), each at its model_max_length
(tokenizer_2 pads with "!"), no attention mask; text_states = concat(h1[-2], h2[-2]) (clip_skip:
hidden_states[-(clip_skip + 2)], prompt only), pooled = text_embeds of encoder 2. Negative prompts
None with the model_index option force_zeros_for_empty_prompt (default True): null_cond's
text_states and pooled are zeros; else the negatives ("" for None) are encoded the same way.
time_ids = (H, W, 0, 0, H, W) for an image of (H, W) = image_size (default the UNet's sample_size
times the VAE factor), the same in null_cond (diffusers' defaults: original_size = target_size =
(H, W), crops (0, 0)); `sdxl_time_ids` builds other values.

SD3 (diffusers 0.42 `StableDiffusion3Pipeline.encode_prompt`): the same text to the three
tokenizers (no prompt_2 / prompt_3); both CLIP tokenizers at `tokenizer`'s model_max_length, no
mask, hidden_states[-2] (clip_skip: [-(clip_skip + 2)], prompt only); T5 at max_sequence_length
(default 256, at most 512), no mask; text_encoder_3 null in model_index: zero T5 states (B, 256,
joint_attention_dim). Negative prompts: "" for None, encoded the same way (not zeros).

Flux (diffusers 0.42 `FluxPipeline.encode_prompt`): pooled = CLIP's pooler_output (tokenizer at its
model_max_length), text_states = T5's at max_sequence_length (default 512, at most 512), no masks,
no clip_skip. null_cond encodes the negative prompts ("" for None); FluxPipeline guides with them
only when true_cfg_scale > 1 and they are given (pipelines/sampling.py). With a guidance-embedding
transformer both dicts get "guidance": `encode_prompts(guidance_scale=)` (default 3.5, the
pipeline's), the same in cond and null_cond as the pipeline passes it to both calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError

if TYPE_CHECKING:
    from fewstep_jax.pipelines.folder import LatentPipeline

Array = jax.Array
Cond = dict[str, Array]


@functools.cache
def _jitted(module: Any) -> Any:
    """jit(module.apply), one per (hashable) module, so repeated prompts reuse the compilation."""
    return jax.jit(module.apply)


def _negatives(negative_prompts: str | Sequence[str] | None, batch: int) -> list[str] | None:
    """None stays None (SDXL tells it from ""); the encoders read it as "" for each prompt."""
    if negative_prompts is None:
        return None
    if isinstance(negative_prompts, str):
        return [negative_prompts] * batch
    negatives = list(negative_prompts)
    if len(negatives) != batch:
        raise UserError(f"got {len(negatives)} negative prompts for {batch} prompts")
    return negatives


def encode_prompts(
    pipe: LatentPipeline,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    guidance_scale: float | None = None,
) -> tuple[Cond, Cond]:
    """(cond, null_cond) of `prompts` and `negative_prompts` (None: "" for each, diffusers'
    default, or SDXL's zeros with force_zeros_for_empty_prompt; one str: repeated) for the
    pipeline's family (see the module docstring for the keys).

    image_size: (height, width) in pixels, for families with size conditions (default: the
      denoiser's sample_size times the VAE factor, diffusers' default size).
    max_sequence_length: the text length (default the pipeline's: 120 PixArt-alpha, 300 Sigma,
      T5's 256 SD3 and 512 Flux).
    clip_skip: CLIP families' layers skipped from the end for the prompt (None: the last state).
    guidance_scale: the embedded guidance of a guidance-distilled transformer (FLUX.1-dev), put in
      both dicts as "guidance" (B,) (default the pipeline's, 3.5); an error for CFG families.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise UserError("encode_prompts: no prompts")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise UserError(f"encode_prompts: prompts must be str, got {bad}")
    default = pipe.spec.embedded_guidance
    if guidance_scale is not None and default is None:
        raise UserError(
            f"encode_prompts: guidance_scale is the guidance input of a guidance-embedding transformer; "
            f"{pipe.pipeline_class} guides with CFG (sampling.sample's guidance_scale)"
        )
    cond, null = pipe.spec.encode(
        pipe,
        texts,
        _negatives(negative_prompts, len(texts)),
        image_size=image_size,
        max_sequence_length=max_sequence_length,
        clip_skip=clip_skip,
    )
    if default is not None and getattr(pipe.denoiser.module, "guidance_embeds", False):
        scale = default if guidance_scale is None else guidance_scale
        guidance = jnp.full((len(texts),), float(scale), jnp.float32)
        cond, null = {**cond, "guidance": guidance}, {**null, "guidance": guidance}
    return cond, null


def _t5_at(tokenizer: Any, max_length: int) -> Any:
    """The T5 tokenizer at another max_length (same model and special tokens)."""
    if tokenizer.max_length == max_length:
        return tokenizer
    from fewstep_jax.text.t5_tokenizer import T5Tokenizer

    return T5Tokenizer(tokenizer.processor, max_length, tokenizer.special, tokenizer.eos_id, tokenizer.pad_id)


def _t5_length(pipe: LatentPipeline, max_sequence_length: int | None) -> int:
    """SD3 / Flux's T5 length: the pipeline's default, at most 512 (their check_inputs)."""
    length = int(max_sequence_length or pipe.spec.max_sequence_length)
    if not 1 <= length <= 512:
        raise UserError(f"{pipe.pipeline_class}: max_sequence_length must be in [1, 512], got {length}")
    return length


def _t5_states(pipe: LatentPipeline, encoder: str, tokenizer: str, texts: list[str], length: int) -> Array:
    """(B, length, d_model) last_hidden_state of T5 `encoder` on `texts`, without a mask (SD3 and
    Flux call their T5 on the ids alone)."""
    t5 = pipe.models[encoder]
    ids = jnp.asarray(_t5_at(pipe.tokenizers[tokenizer], length)(texts)["input_ids"])
    return _jitted(t5.module)({"params": t5.params}, ids, None).astype(jnp.float32)


def _clip_outputs(
    pipe: LatentPipeline, pairs: Sequence[tuple[str, str]], texts: list[str], length: int | None
) -> list:
    """CLIPTextOutput of each (encoder, tokenizer) component pair on `texts` at `length` tokens
    (None: each tokenizer's model_max_length), no mask."""
    outs = []
    for enc, tok in pairs:
        encoder = pipe.models[enc]
        ids = jnp.asarray(pipe.tokenizers[tok](texts, length)["input_ids"])
        outs.append(_jitted(encoder.module)({"params": encoder.params}, ids, None))
    return outs


def encode_pixart(
    pipe: LatentPipeline,
    prompts: list[str],
    negatives: list[str] | None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
) -> tuple[Cond, Cond]:
    """PixArt-alpha / Sigma: T5 states and mask of each prompt list (module docstring)."""
    negatives = negatives or [""] * len(prompts)
    if clip_skip is not None:
        raise UserError(f"clip_skip is an option of the CLIP text encoders, not of {pipe.pipeline_class}")
    length = int(max_sequence_length or pipe.spec.max_sequence_length)
    tokenizer = _t5_at(pipe.tokenizers["tokenizer"], length)
    encoder = pipe.models["text_encoder"]
    run = _jitted(encoder.module)

    def encode(texts: list[str]) -> Cond:
        tokens = tokenizer([t.lower().strip() for t in texts])
        mask = jnp.asarray(tokens["attention_mask"], jnp.int32)
        states = run({"params": encoder.params}, jnp.asarray(tokens["input_ids"]), mask)
        return {"text_states": states.astype(jnp.float32), "text_mask": mask}

    cond, null = encode(prompts), encode(negatives)
    transformer = pipe.denoiser.module
    # PixArtAlphaPipeline's rule (not the transformer's use_additional_conditions): sample_size 128
    if pipe.family == "pixart_alpha" and transformer.sample_size == 128:
        if image_size is None:
            side = transformer.sample_size * pipe.vae_scale_factor
            image_size = (side, side)
        height, width = (int(s) for s in image_size)
        b = len(prompts)
        sizes = {
            "resolution": jnp.asarray(np.tile([[height, width]], (b, 1)), jnp.float32),
            "aspect_ratio": jnp.full((b, 1), float(height / width), jnp.float32),
        }
        cond, null = {**cond, **sizes}, {**null, **sizes}
    return cond, null


def encode_sd(
    pipe: LatentPipeline,
    prompts: list[str],
    negatives: list[str] | None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
) -> tuple[Cond, Cond]:
    """StableDiffusionPipeline: CLIP states of each prompt list (module docstring)."""
    negatives = negatives or [""] * len(prompts)
    from fewstep_jax.models.clip_text import sd_text_states

    tokenizer = pipe.tokenizers["tokenizer"]
    length = int(max_sequence_length or tokenizer.max_length)
    encoder = pipe.models["text_encoder"]
    run = _jitted(encoder.module)

    def encode(texts: list[str], skip: int | None) -> Cond:
        tokens = tokenizer(texts, length)
        mask = jnp.asarray(tokens["attention_mask"]) if encoder.module.use_attention_mask else None
        out = run({"params": encoder.params}, jnp.asarray(tokens["input_ids"]), mask)
        return {"text_states": sd_text_states(out, skip).astype(jnp.float32)}

    return encode(prompts, clip_skip), encode(negatives, None)


def sdxl_time_ids(
    batch: int,
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> Array:
    """(batch, 6) float32 add_time_ids of StableDiffusionXLPipeline._get_add_time_ids:
    original_size + crops_coords_top_left + target_size (default original_size), (height, width)
    pairs in pixels, (top, left) for the crop."""
    target = original_size if target_size is None else target_size
    ids = [*original_size, *crops_coords_top_left, *target]
    return jnp.asarray(np.tile(np.asarray(ids, np.float32), (batch, 1)))


def encode_sdxl(
    pipe: LatentPipeline,
    prompts: list[str],
    negatives: list[str] | None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
) -> tuple[Cond, Cond]:
    """StableDiffusionXLPipeline: both CLIP encoders' states, encoder 2's pooled projection, and
    the size conditions of each prompt list (module docstring)."""
    from fewstep_jax.models.clip_text import sdxl_text_states

    # text_encoder / tokenizer null in model_index: encoder 2 alone, as diffusers does
    pairs = [
        (enc, tok)
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        if enc in pipe.models and tok in pipe.tokenizers
    ]

    def encode(texts: list[str], skip: int | None) -> Cond:
        outs = _clip_outputs(pipe, pairs, texts, max_sequence_length)
        states, pooled = sdxl_text_states(outs[0] if len(outs) == 2 else None, outs[-1], skip)
        return {"text_states": states.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}

    cond = encode(prompts, clip_skip)
    if negatives is None and pipe.options.get("force_zeros_for_empty_prompt", True):
        null = {k: jnp.zeros_like(v) for k, v in cond.items()}
    else:
        null = encode(negatives or [""] * len(prompts), None)
    if image_size is None:  # diffusers' default_sample_size: the UNet's, 128 when unset
        side = pipe.denoiser.module.sample_size or 128
        sides = side if isinstance(side, (list, tuple)) else (side, side)
        image_size = (sides[0] * pipe.vae_scale_factor, sides[1] * pipe.vae_scale_factor)
    size = (int(image_size[0]), int(image_size[1]))
    time_ids = sdxl_time_ids(len(prompts), size)
    return {**cond, "time_ids": time_ids}, {**null, "time_ids": time_ids}


def encode_sd3(
    pipe: LatentPipeline,
    prompts: list[str],
    negatives: list[str] | None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
) -> tuple[Cond, Cond]:
    """StableDiffusion3Pipeline: CLIP-L / G + T5 states and both CLIP projections (module docstring)."""
    from fewstep_jax.models.clip_text import sdxl_text_states

    length = _t5_length(pipe, max_sequence_length)
    clip_length = pipe.tokenizers["tokenizer"].max_length  # the pipeline's tokenizer_max_length, for both
    joint = pipe.denoiser.module.joint_attention_dim

    def encode(texts: list[str], skip: int | None) -> Cond:
        out1, out2 = _clip_outputs(
            pipe, [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")], texts, clip_length
        )
        clip_states, pooled2 = sdxl_text_states(out1, out2, skip)  # SDXL's layer rule and concat
        if "text_encoder_3" in pipe.models:
            t5 = _t5_states(pipe, "text_encoder_3", "tokenizer_3", texts, length)
        else:
            t5 = jnp.zeros((len(texts), length, joint), jnp.float32)
        pad = t5.shape[-1] - clip_states.shape[-1]
        clip_states = jnp.pad(clip_states.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
        return {
            "text_states": jnp.concatenate([clip_states, t5], axis=1),
            "pooled": jnp.concatenate([out1.text_embeds, pooled2], axis=-1).astype(jnp.float32),
        }

    return encode(prompts, clip_skip), encode(negatives or [""] * len(prompts), None)


def encode_flux(
    pipe: LatentPipeline,
    prompts: list[str],
    negatives: list[str] | None,
    *,
    image_size: tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
) -> tuple[Cond, Cond]:
    """FluxPipeline: T5 states and CLIP's pooled output (module docstring); "guidance" is added by
    encode_prompts."""
    if clip_skip is not None:
        raise UserError(
            f"clip_skip is not an option of {pipe.pipeline_class} (it reads CLIP's pooled output)"
        )
    length = _t5_length(pipe, max_sequence_length)
    clip_length = pipe.tokenizers["tokenizer"].max_length

    def encode(texts: list[str]) -> Cond:
        (out,) = _clip_outputs(pipe, [("text_encoder", "tokenizer")], texts, clip_length)
        return {
            "text_states": _t5_states(pipe, "text_encoder_2", "tokenizer_2", texts, length),
            "pooled": out.pooler_output.astype(jnp.float32),
        }

    return encode(prompts), encode(negatives or [""] * len(prompts))


__all__ = [
    "encode_flux",
    "encode_pixart",
    "encode_prompts",
    "encode_sd",
    "encode_sd3",
    "encode_sdxl",
    "sdxl_time_ids",
]
