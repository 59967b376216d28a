"""A diffusers pipeline folder (model_index.json + one folder per component) loaded into JAX.

`load_pipeline(folder)` reads `model_index.json`, looks its `_class_name` up in `PIPELINES`, the one
table {diffusers pipeline class: FamilySpec}, and loads every component the family needs with the
loader its model_index class names: the denoiser (`transformer/` or `unet/`), the VAE, the text
encoders and tokenizers, and the scheduler config read into the project's scheduler mirror
(schedules/scheduler_config.py). Weights are safetensors only (pipelines/weights.py): pickled
`.bin` / `.ckpt` files are never loaded.

Families (diffusers 0.42 pipelines):
  pixart_alpha  PixArtAlphaPipeline   transformer (PixArtTransformer2DModel, or the older
                                      Transformer2DModel configs), vae, T5 text_encoder + tokenizer
                                      (120 tokens)
  pixart_sigma  PixArtSigmaPipeline   the same components, 300 tokens, no size conditions
  sd            StableDiffusionPipeline  unet (UNet2DConditionModel; no LCM guidance embedding,
                                      added or class embeddings), vae, CLIPTextModel text_encoder
                                      + CLIPTokenizer (77 tokens); the safety checker is not run
  sdxl          StableDiffusionXLPipeline  unet (UNet2DConditionModel with addition_embed_type
                                      "text_time"), vae (no latents_mean / latents_std),
                                      CLIPTextModel text_encoder + CLIPTokenizer (both optional:
                                      null in model_index gives encoder 2 alone, as diffusers),
                                      CLIPTextModelWithProjection text_encoder_2 + tokenizer_2;
                                      the invisible watermark is not applied
  sd3           StableDiffusion3Pipeline  transformer (SD3Transformer2DModel), vae (shift_factor),
                                      CLIPTextModelWithProjection text_encoder + tokenizer and
                                      text_encoder_2 + tokenizer_2 (77 tokens), T5EncoderModel
                                      text_encoder_3 + tokenizer_3 (256 tokens; optional: null
                                      gives zero T5 states, as diffusers); FlowMatchEulerDiscrete
  flux          FluxPipeline          transformer (FluxTransformer2DModel; FLUX.1-dev's guidance
                                      embedding or schnell's none) on latents packed 2 x 2 (packed
                                      inside its denoiser call), vae (shift_factor), CLIPTextModel
                                      text_encoder (pooled) + tokenizer, T5EncoderModel
                                      text_encoder_2 + tokenizer_2 (512 tokens); FlowMatchEulerDiscrete
                                      (mu of the image tokens, FluxPipeline's sigmas); guidance_scale
                                      is the embedded guidance, CFG is true_cfg_scale with negatives
A family is one `FamilySpec`: its component folders with a loader per accepted component class,
its text length, its prompt encoder (pipelines/prompts.py), its denoiser call (`denoiser_apply`)
and how its pipeline guides and schedules; the pipeline's other model_index entries
(requires_safety_checker, ...) are kept as `options`. Every denoiser call takes NHWC latents
(B, h, w, `pipe.latent_channels`), Flux's included.

Schedulers: a mirrored class (DDIM, DDPM, LCM, TCD, FlowMatchEulerDiscrete) is read as it is
saved; another class (PixArt's DPMSolverMultistepScheduler, SD's PNDMScheduler) is not mirrored:
the pipeline then has `scheduler=None` and `scheduler_note` says why, and `scheduler_as(pipe,
"ddim")` (or `load_pipeline(folder, scheduler="ddim")`) rebuilds the folder's config as a
mirrored class, as diffusers' `DDIMScheduler.from_config(pipe.scheduler.config)` does (options the
new class lacks are dropped).

Use:
  pipe = load_pipeline("PixArt-alpha-folder", scheduler="ddim")
  cond, null_cond = encode_prompts(pipe, ["a cat"])           # pipelines/prompts.py
  eps = denoiser_apply(pipe)(pipe.denoiser.params, latents_nhwc, timesteps, cond)
  images = sample(pipe, ["a cat"], latents_nhwc, 20, 4.5)   # pipelines/sampling.py
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError, did_you_mean
from fewstep_jax.pipelines import prompts
from fewstep_jax.pipelines.weights import read_json
from fewstep_jax.schedules.flow_match_scheduler import FlowMatchConfig, image_seq_len
from fewstep_jax.schedules.scheduler_config import (
    DEFAULTS as SCHEDULER_DEFAULTS,
)
from fewstep_jax.schedules.scheduler_config import (
    SchedulerConfig,
    read_scheduler_config,
    scheduler_class,
)

Array = jax.Array
# fn(params, latents (B, h, w, C) NHWC, timestep (B,) in diffusers' units, cond dict) -> (B, h, w, C)
DenoiserFn = Callable[[Any, Array, Array, Mapping[str, Array]], Array]
MODEL_INDEX = "model_index.json"
FAMILIES = ("pixart_alpha", "pixart_sigma", "sd", "sdxl", "sd3", "flux")


@dataclasses.dataclass(frozen=True, eq=False)
class Component:
    """A loaded network: the Flax module and its float32 params (apply as {"params": params})."""

    module: Any
    params: Any


# ---- one loader per component class --------------------------------------------------------------
# loader(folder, dtype, variant, max_length) -> a Component (networks) or a tokenizer
Loader = Callable[[str, str, "str | None", "int | None"], Any]


def _pixart_transformer(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.pixart import load_pixart_transformer

    return Component(*load_pixart_transformer(folder, dtype, variant=variant))


def _vae(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.vae import load_vae

    module, variables = load_vae(folder, dtype, variant)
    return Component(module, variables["params"])


def _t5_encoder(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.t5_encoder import load_t5_encoder

    return Component(*load_t5_encoder(folder, dtype, variant=variant))


def _t5_tokenizer(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Any:
    from fewstep_jax.text.t5_tokenizer import load_t5_tokenizer

    return load_t5_tokenizer(folder, max_length or 512)


def _unet_condition(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.unet_condition import load_unet_condition

    return Component(*load_unet_condition(folder, dtype, variant=variant))


def _clip_text(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.clip_text import load_clip_text_encoder

    return Component(*load_clip_text_encoder(folder, dtype, variant=variant))


def _clip_tokenizer(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Any:
    """At the folder's model_max_length whatever the family's text length (that is T5's in SD3 /
    Flux); the diffusers pipelines tokenize CLIP at it."""
    from fewstep_jax.text.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(folder)


def _sd3_transformer(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.sd3 import load_sd3_transformer

    return Component(*load_sd3_transformer(folder, dtype, variant=variant))


def _flux_transformer(folder: str, dtype: str, variant: str | None, max_length: int | None) -> Component:
    from fewstep_jax.models.flux import load_flux_transformer

    return Component(*load_flux_transformer(folder, dtype, variant=variant))


PIXART_TRANSFORMERS: dict[str, Loader] = {
    "PixArtTransformer2DModel": _pixart_transformer,
    "Transformer2DModel": _pixart_transformer,  # PixArt-alpha folders saved before diffusers 0.28
}
VAES: dict[str, Loader] = {"AutoencoderKL": _vae}
T5_ENCODERS: dict[str, Loader] = {"T5EncoderModel": _t5_encoder}
T5_TOKENIZERS: dict[str, Loader] = {"T5Tokenizer": _t5_tokenizer, "T5TokenizerFast": _t5_tokenizer}
UNETS: dict[str, Loader] = {"UNet2DConditionModel": _unet_condition}
CLIP_TEXT: dict[str, Loader] = {"CLIPTextModel": _clip_text}
CLIP_TEXT_PROJ: dict[str, Loader] = {"CLIPTextModelWithProjection": _clip_text}
CLIP_TOKENIZERS: dict[str, Loader] = {"CLIPTokenizer": _clip_tokenizer, "CLIPTokenizerFast": _clip_tokenizer}
SD3_TRANSFORMERS: dict[str, Loader] = {"SD3Transformer2DModel": _sd3_transformer}
FLUX_TRANSFORMERS: dict[str, Loader] = {"FluxTransformer2DModel": _flux_transformer}


# ---- the denoiser call of each family ------------------------------------------------------------
def _pixart_apply(pipe: LatentPipeline) -> DenoiserFn:
    """PixArtTransformer2D on cond {"text_states", "text_mask"[, "resolution", "aspect_ratio"]};
    with learned sigma, the first half of the channels (torch.chunk(2)'s first part), as
    PixArtAlphaPipeline / PixArtSigmaPipeline take after guidance (slicing first is the same:
    guidance is per channel)."""
    module = pipe.denoiser.module
    keep = -(-module.output_channels // 2) if module.output_channels // 2 == module.in_channels else None

    def fn(params: Any, latents: Array, timestep: Array, cond: Mapping[str, Array]) -> Array:
        added = {k: cond[k] for k in ("resolution", "aspect_ratio") if k in cond} or None
        out = module.apply(
            {"params": params}, latents, timestep, cond["text_states"], cond.get("text_mask"), added
        )
        return out if keep is None else out[..., :keep]

    return fn


def _unet_apply(pipe: LatentPipeline) -> DenoiserFn:
    """UNet2DCondition on cond {"text_states"} (StableDiffusionPipeline's unet call)."""
    module = pipe.denoiser.module

    def fn(params: Any, latents: Array, timestep: Array, cond: Mapping[str, Array]) -> Array:
        return module.apply({"params": params}, latents, timestep, cond["text_states"])

    return fn


def _sdxl_apply(pipe: LatentPipeline) -> DenoiserFn:
    """UNet2DCondition on cond {"text_states", "pooled", "time_ids"} (StableDiffusionXLPipeline's
    unet call: added_cond_kwargs {"text_embeds": pooled, "time_ids": time_ids})."""
    module = pipe.denoiser.module

    def fn(params: Any, latents: Array, timestep: Array, cond: Mapping[str, Array]) -> Array:
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return module.apply({"params": params}, latents, timestep, cond["text_states"], added)

    return fn


def _sd3_apply(pipe: LatentPipeline) -> DenoiserFn:
    """SD3Transformer2D on cond {"text_states", "pooled"} (StableDiffusion3Pipeline's call: the
    timestep as the scheduler gives it, sigma * 1000)."""
    module = pipe.denoiser.module

    def fn(params: Any, latents: Array, timestep: Array, cond: Mapping[str, Array]) -> Array:
        return module.apply({"params": params}, latents, timestep, cond["text_states"], cond["pooled"])

    return fn


def _flux_apply(pipe: LatentPipeline) -> DenoiserFn:
    """FluxTransformer2D on NHWC latents and cond {"text_states", "pooled"[, "guidance"]}, as
    FluxPipeline calls it: the latents packed 2 x 2 (and the output unpacked, so the scheduler steps
    NHWC latents: its step is elementwise), img_ids of the packed grid, txt_ids zeros, timestep / 1000,
    cond["guidance"] (B,) the guidance scale when the transformer embeds it (FLUX.1-dev)."""
    from fewstep_jax.models.flux import TIME_SCALE, latent_image_ids, pack_latents, unpack_latents

    module = pipe.denoiser.module

    def fn(params: Any, latents: Array, timestep: Array, cond: Mapping[str, Array]) -> Array:
        _, h, w, _ = latents.shape
        states = cond["text_states"]
        guidance = None
        if module.guidance_embeds:
            if "guidance" not in cond:
                raise UserError(
                    f"{pipe.folder}: the Flux transformer embeds the guidance scale: cond needs "
                    '"guidance" (B,) (encode_prompts(..., guidance_scale=) adds it)'
                )
            guidance = cond["guidance"]
        # numpy ids stay concrete under jit: the rotary tables are then float64 as diffusers'
        img_ids = latent_image_ids(h // 2, w // 2)
        txt_ids = np.zeros((states.shape[1], 3), np.float32)
        t = jnp.asarray(timestep, jnp.float32) / TIME_SCALE
        out = module.apply(
            {"params": params}, pack_latents(latents), t, states, cond["pooled"], img_ids, txt_ids, guidance
        )
        return unpack_latents(out, h, w)

    return fn


def _check_sdxl(pipe: LatentPipeline) -> None:
    """StableDiffusionXLPipeline's UNet: the text_time added embedding of pooled (text_encoder_2's
    projection) + 6 time ids, cross-attention on both encoders' states; refuse anything else."""
    unet = pipe.denoiser.module
    where = f"{pipe.folder}/unet/config.json"
    extra = {
        "time_cond_proj_dim": unet.time_cond_proj_dim,
        "class_embed_type": unet.class_embed_type,
        "num_class_embeds": unet.num_class_embeds,
    }
    given = {k: v for k, v in extra.items() if v is not None}
    if unet.addition_embed_type != "text_time":
        given["addition_embed_type"] = unet.addition_embed_type
    if given:
        raise UserError(
            f"{where}: {given} is not supported in a StableDiffusionXLPipeline here (the sdxl family "
            'needs addition_embed_type="text_time" and no class or guidance embedding)'
        )
    _check_vae(pipe)
    encoder2 = _projected(pipe, "text_encoder_2")
    # diffusers' _get_add_time_ids check, made at load instead of at the first call
    passed = unet.addition_time_embed_dim * 6 + encoder2.projection_dim
    if passed != unet.projection_class_embeddings_input_dim:
        raise UserError(
            f"{where}: projection_class_embeddings_input_dim {unet.projection_class_embeddings_input_dim} "
            f"!= 6 time ids x addition_time_embed_dim {unet.addition_time_embed_dim} + text_encoder_2 "
            f"projection_dim {encoder2.projection_dim} = {passed}"
        )
    width = sum(m.module.hidden_size for m in pipe.text_encoders)
    dims = unet.cross_attention_dim
    if any(d != width for d in (dims if isinstance(dims, (list, tuple)) else [dims])):
        raise UserError(
            f"{where}: cross_attention_dim {unet.cross_attention_dim} != the text encoders' widths "
            f"summed ({width})"
        )


def _check_vae(pipe: LatentPipeline) -> None:
    """The sdxl / sd3 / flux pipelines decode latents / scaling_factor (+ shift_factor): a VAE
    whose config asks for a per-channel latents_mean / latents_std is refused."""
    vae = pipe.vae.module
    if vae.latents_mean is not None or vae.latents_std is not None:
        raise UserError(
            f"{pipe.folder}/vae/config.json: latents_mean / latents_std are not supported here "
            f"(the {pipe.family} family decodes latents / scaling_factor + shift_factor)"
        )


def _projected(pipe: LatentPipeline, name: str) -> Any:
    """The module of text encoder `name`, which must have a text_projection."""
    encoder = pipe.models[name].module
    if encoder.projection_dim is None:
        raise UserError(f"{pipe.folder}/{name} has no text_projection (CLIPTextModelWithProjection)")
    return encoder


def _check_widths(pipe: LatentPipeline, checks: Mapping[str, tuple[int, int, str]]) -> None:
    """{denoiser config option: (its value, the width it must equal, what gives that width)}."""
    for option, (value, width, source) in checks.items():
        if value != width:
            raise UserError(
                f"{pipe.folder}/{pipe.spec.denoiser}/config.json: {option} {value} != {source} ({width})"
            )


def _check_sd3(pipe: LatentPipeline) -> None:
    """StableDiffusion3Pipeline's shapes, checked at load instead of failing in the first call:
    pooled = both CLIP projections, the CLIP states padded to T5's width = joint_attention_dim,
    latent channels = the VAE's."""
    _check_vae(pipe)
    transformer = pipe.denoiser.module
    clips = [_projected(pipe, name) for name in ("text_encoder", "text_encoder_2")]
    checks = {
        "pooled_projection_dim": (
            transformer.pooled_projection_dim,
            sum(c.projection_dim for c in clips),
            "text_encoder + text_encoder_2 projection_dim",
        ),
        "in_channels": (transformer.in_channels, pipe.vae.module.latent_channels, "vae latent_channels"),
    }
    if "text_encoder_3" in pipe.models:
        t5 = pipe.models["text_encoder_3"].module
        checks["joint_attention_dim"] = (
            transformer.joint_attention_dim,
            t5.d_model,
            "text_encoder_3 d_model",
        )
    _check_widths(pipe, checks)
    width = sum(c.hidden_size for c in clips)
    if width > transformer.joint_attention_dim:  # diffusers' F.pad would crop the CLIP states
        raise UserError(
            f"{pipe.folder}/transformer/config.json: joint_attention_dim {transformer.joint_attention_dim} "
            f"< the CLIP encoders' widths summed ({width})"
        )


def _check_flux(pipe: LatentPipeline) -> None:
    """FluxPipeline's shapes: packed 2 x 2 latents (in_channels = 4 x the VAE's latent channels),
    pooled = CLIP's pooler_output, text states = T5's, three rope axes (FluxPipeline's ids)."""
    _check_vae(pipe)
    transformer = pipe.denoiser.module
    clip, t5 = pipe.models["text_encoder"].module, pipe.models["text_encoder_2"].module
    latent = pipe.vae.module.latent_channels
    _check_widths(
        pipe,
        {
            "in_channels": (transformer.in_channels, 4 * latent, "4 x vae latent_channels (2 x 2 packing)"),
            "pooled_projection_dim": (
                transformer.pooled_projection_dim,
                clip.hidden_size,
                "text_encoder hidden_size",
            ),
            "joint_attention_dim": (transformer.joint_attention_dim, t5.d_model, "text_encoder_2 d_model"),
            "len(axes_dims_rope)": (
                len(transformer.axes_dims_rope),
                3,
                "FluxPipeline's (0, row, column) ids",
            ),
        },
    )


def _check_sd(pipe: LatentPipeline) -> None:
    """StableDiffusionPipeline's UNet takes text states only: refuse what it would need more for."""
    unet = pipe.denoiser.module
    extra = {
        "time_cond_proj_dim": unet.time_cond_proj_dim,  # LCM-distilled: guidance embedding, no CFG
        "addition_embed_type": unet.addition_embed_type,  # SDXL's text_time
        "class_embed_type": unet.class_embed_type,
        "num_class_embeds": unet.num_class_embeds,
    }
    given = {k: v for k, v in extra.items() if v is not None}
    if given:
        raise UserError(
            f"{pipe.folder}/unet/config.json: {given} is not supported in a StableDiffusionPipeline "
            "here (the sd family conditions on text states only)"
        )


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What one diffusers pipeline class needs.

    components: {component folder: {accepted model_index class: loader}} (the scheduler is read
      separately, whatever its class); optional: components that may be null in model_index.
    denoiser: the component that is the diffusion network ("transformer" | "unet").
    max_sequence_length: the pipeline's default T5 text length (its T5 tokenizer is loaded at it;
      CLIP tokenizers at their model_max_length: None for the CLIP-only families).
    encode: the family's prompt encoder (pipelines/prompts.py), apply: its denoiser call.
    one_step_x0: the pipeline returns the step's predicted x0 when num_inference_steps == 1
      (PixArtAlphaPipeline's `scheduler.step(...)[1]`).
    validate: raises a UserError for a loaded pipeline the family cannot run (None: no check).
    embedded_guidance: the pipeline's default guidance_scale when that scale is the transformer's
      guidance input cond["guidance"] rather than CFG (FluxPipeline: 3.5; its CFG is true_cfg_scale
      with negative prompts); None: guidance_scale is the CFG scale.
    flux_sigmas: the pipeline passes FluxPipeline's sigmas linspace(1, 1/N, N) to set_timesteps.
    """

    family: str
    denoiser: str
    components: Mapping[str, Mapping[str, Loader]]
    max_sequence_length: int | None
    encode: Callable[..., tuple[dict[str, Array], dict[str, Array]]]
    apply: Callable[[LatentPipeline], DenoiserFn]
    optional: tuple[str, ...] = ()
    one_step_x0: bool = False
    validate: Callable[[LatentPipeline], None] | None = None
    embedded_guidance: float | None = None
    flux_sigmas: bool = False


_PIXART_COMPONENTS = {
    "transformer": PIXART_TRANSFORMERS,
    "vae": VAES,
    "text_encoder": T5_ENCODERS,
    "tokenizer": T5_TOKENIZERS,
}
PIPELINES: dict[str, FamilySpec] = {
    "PixArtAlphaPipeline": FamilySpec(
        "pixart_alpha",
        "transformer",
        _PIXART_COMPONENTS,
        120,
        prompts.encode_pixart,
        _pixart_apply,
        one_step_x0=True,
    ),
    "PixArtSigmaPipeline": FamilySpec(
        "pixart_sigma", "transformer", _PIXART_COMPONENTS, 300, prompts.encode_pixart, _pixart_apply
    ),
    "StableDiffusionPipeline": FamilySpec(
        "sd",
        "unet",
        {"unet": UNETS, "vae": VAES, "text_encoder": CLIP_TEXT, "tokenizer": CLIP_TOKENIZERS},
        None,  # the tokenizer's model_max_length (77)
        prompts.encode_sd,
        _unet_apply,
        validate=_check_sd,
    ),
    "StableDiffusionXLPipeline": FamilySpec(
        "sdxl",
        "unet",
        {
            "unet": UNETS,
            "vae": VAES,
            "text_encoder": CLIP_TEXT,
            "tokenizer": CLIP_TOKENIZERS,
            "text_encoder_2": CLIP_TEXT_PROJ,
            "tokenizer_2": CLIP_TOKENIZERS,
        },
        None,  # each tokenizer's model_max_length (77)
        prompts.encode_sdxl,
        _sdxl_apply,
        optional=("text_encoder", "tokenizer"),
        validate=_check_sdxl,
    ),
    "StableDiffusion3Pipeline": FamilySpec(
        "sd3",
        "transformer",
        {
            "transformer": SD3_TRANSFORMERS,
            "vae": VAES,
            "text_encoder": CLIP_TEXT_PROJ,
            "tokenizer": CLIP_TOKENIZERS,
            "text_encoder_2": CLIP_TEXT_PROJ,
            "tokenizer_2": CLIP_TOKENIZERS,
            "text_encoder_3": T5_ENCODERS,
            "tokenizer_3": T5_TOKENIZERS,
        },
        256,  # T5's; CLIP's is tokenizer's model_max_length (77)
        prompts.encode_sd3,
        _sd3_apply,
        optional=("text_encoder_3", "tokenizer_3"),  # null: zero T5 states, as diffusers
        validate=_check_sd3,
    ),
    "FluxPipeline": FamilySpec(
        "flux",
        "transformer",
        {
            "transformer": FLUX_TRANSFORMERS,
            "vae": VAES,
            "text_encoder": CLIP_TEXT,
            "tokenizer": CLIP_TOKENIZERS,
            "text_encoder_2": T5_ENCODERS,
            "tokenizer_2": T5_TOKENIZERS,
        },
        512,  # T5's; CLIP's is tokenizer's model_max_length (77)
        prompts.encode_flux,
        _flux_apply,
        validate=_check_flux,
        embedded_guidance=3.5,
        flux_sigmas=True,
    ),
}


@dataclasses.dataclass(frozen=True, eq=False)
class LatentPipeline:
    """A loaded pipeline folder.

    models: {component: Component} of the networks (transformer / unet, vae, text_encoder*);
    tokenizers: {component: tokenizer}; scheduler: the project's mirror of the folder's scheduler
    (None when its class is not mirrored: `scheduler_note` says why); scheduler_config: the
    folder's scheduler_config.json as saved; index: model_index.json's {component: (library,
    class)}; options: its other entries (`pipeline_options`); dtype: the compute dtype of every
    network.
    """

    folder: str
    pipeline_class: str
    spec: FamilySpec
    models: Mapping[str, Component]
    tokenizers: Mapping[str, Any]
    scheduler: SchedulerConfig | FlowMatchConfig | None
    scheduler_config: Mapping[str, Any]
    scheduler_note: str | None
    index: Mapping[str, tuple[str, str]]
    options: Mapping[str, Any]
    dtype: str

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def denoiser(self) -> Component:
        return self.models[self.spec.denoiser]

    @property
    def vae(self) -> Component:
        return self.models["vae"]

    @property
    def text_encoders(self) -> tuple[Component, ...]:
        """In diffusers' order: text_encoder, text_encoder_2, text_encoder_3 (those present)."""
        return tuple(self.models[k] for k in sorted(self.models) if k.startswith("text_encoder"))

    @property
    def latent_channels(self) -> int:
        """Channels C of the NHWC latents the scheduler steps: the denoiser's in_channels, a quarter
        of them for Flux (its transformer takes the latents packed 2 x 2)."""
        channels = self.denoiser.module.in_channels
        return channels // 4 if self.family == "flux" else channels

    def image_tokens(self, latent_size: tuple[int, int]) -> int:
        """The denoiser's image tokens for latents of (h, w), the pipelines' image_seq_len of mu:
        patches of the transformer's patch_size (SD3), Flux's 2 x 2 packed tokens."""
        patch = 2 if self.family == "flux" else getattr(self.denoiser.module, "patch_size", 1)
        return image_seq_len(latent_size[0], latent_size[1], 1, patch)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent, as the pipelines compute it: 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.vae.module.block_out_channels) - 1)


def read_model_index(folder: str) -> dict[str, tuple[str, str]]:
    """{component: (library, class name)} of `folder`/model_index.json; null components (e.g. an
    absent safety_checker, SDXL refiner's text_encoder), "_" keys and the pipeline's own options
    (`pipeline_options`) are left out."""
    return _read_index(folder)[0]


def pipeline_options(folder: str) -> dict[str, Any]:
    """The pipeline's registered options in model_index.json: the entries that are not [library,
    class] pairs (requires_safety_checker, SDXL's force_zeros_for_empty_prompt, ...)."""
    return _read_index(folder)[1]


def _read_index(folder: str) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isdir(folder):
        raise UserError(f"pipeline folder {folder!r} not found")
    if not os.path.isfile(path):
        raise UserError(f"{folder!r} is not a diffusers pipeline folder: it has no {MODEL_INDEX}")
    components, options = {}, {}
    for name, value in read_json(path).items():
        if name.startswith("_"):
            continue
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        if not pair or not all(v is None or isinstance(v, str) for v in value):
            options[name] = value
        elif value[0] is not None and value[1] is not None:
            components[name] = (value[0], value[1])
    return components, options


def pipeline_spec(pipeline_class: str | None, where: str = MODEL_INDEX) -> FamilySpec:
    """The FamilySpec of a diffusers pipeline class; an unknown one is a UserError naming it and the
    supported classes."""
    if pipeline_class in PIPELINES:
        return PIPELINES[pipeline_class]
    raise UserError(
        f"{where}: pipeline class {pipeline_class!r} is not supported"
        f"{did_you_mean(str(pipeline_class), list(PIPELINES))}; supported: {sorted(PIPELINES)}"
    )


def load_pipeline(
    folder: str, dtype: str = "float32", variant: str | None = None, *, scheduler: str | None = None
) -> LatentPipeline:
    """Every component of the diffusers pipeline `folder` that its family needs.

    dtype: compute dtype of the networks ("float32" | "bfloat16"; params stay float32).
    variant: the weights variant ("fp16", "bf16": `*.fp16.safetensors`), else the plain files.
    scheduler: None for the folder's own scheduler class, or a mirrored class to rebuild its
      config as ("ddim", "DDIMScheduler", ...; see `scheduler_as`).
    A missing component (in model_index or on disk), a component class the family has no loader
    for, or a component without safetensors weights is a UserError naming it.
    """
    index, options = _read_index(folder)
    index_path = os.path.join(folder, MODEL_INDEX)
    pipeline_class = read_json(index_path).get("_class_name")
    spec = pipeline_spec(pipeline_class, index_path)
    models: dict[str, Component] = {}
    tokenizers: dict[str, Any] = {}
    for name, loaders in spec.components.items():
        if name not in index:
            if name in spec.optional:
                continue
            raise UserError(f"{index_path}: {pipeline_class} needs the component {name!r}, which it lacks")
        cls = index[name][1]
        if cls not in loaders:
            raise UserError(
                f"{index_path}: component {name!r} is a {cls}; {pipeline_class} loads {sorted(loaders)}"
            )
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            raise UserError(f"component folder {path!r} ({cls}, listed in {MODEL_INDEX}) not found")
        obj = loaders[cls](path, dtype, variant, spec.max_sequence_length)
        (models if isinstance(obj, Component) else tokenizers)[name] = obj
    sched, config, note = _read_scheduler(folder, index, scheduler)
    pipe = LatentPipeline(
        folder=folder,
        pipeline_class=pipeline_class,
        spec=spec,
        models=models,
        tokenizers=tokenizers,
        scheduler=sched,
        scheduler_config=config,
        scheduler_note=note,
        index=index,
        options=options,
        dtype=str(dtype),
    )
    if spec.validate is not None:
        spec.validate(pipe)
    return pipe


def _read_scheduler(
    folder: str, index: Mapping[str, tuple[str, str]], cls: str | None
) -> tuple[SchedulerConfig | FlowMatchConfig | None, dict[str, Any], str | None]:
    """(mirror or None, the saved config, why None)."""
    if "scheduler" not in index:
        return None, {}, f"{folder!r} lists no scheduler in {MODEL_INDEX}"
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = read_json(path)
    if cls is not None:
        return rebuild_scheduler(config, cls, path), config, None
    source = config.get("_class_name") or index["scheduler"][1]
    if source not in SCHEDULER_DEFAULTS:
        note = (
            f"the folder's {source} is not mirrored by this project "
            f"(mirrored: {sorted(SCHEDULER_DEFAULTS)}); "
            "pass scheduler='ddim' (or another mirrored class) to rebuild its config as that class"
        )
        return None, config, note
    return read_scheduler_config({"_class_name": source, **config}, what=path), config, None


def rebuild_scheduler(
    config: Mapping[str, Any], cls: str, what: str = "scheduler config"
) -> SchedulerConfig | FlowMatchConfig:
    """`config` (a diffusers scheduler config of any class) as the mirrored class `cls`, as
    diffusers' `Cls.from_config(config)`: options `cls` lacks are dropped."""
    target = scheduler_class(cls)
    dropped = set(config) - set(SCHEDULER_DEFAULTS[target])
    return read_scheduler_config(dict(config), target, ignored=dropped, what=what)


def scheduler_as(pipe: LatentPipeline, cls: str) -> SchedulerConfig | FlowMatchConfig:
    """The pipeline folder's scheduler config rebuilt as the mirrored class `cls` ("ddim", ...)."""
    if not pipe.scheduler_config:
        raise UserError(pipe.scheduler_note or f"{pipe.folder!r} has no scheduler config")
    return rebuild_scheduler(pipe.scheduler_config, cls, os.path.join(pipe.folder, "scheduler"))


def denoiser_apply(pipe: LatentPipeline) -> DenoiserFn:
    """The family's denoiser call: fn(params, latents (B, h, w, C) NHWC, timestep (B,) in diffusers'
    units (0..999 integer-valued for the DDPM families; sigma * 1000 for flow matching), cond) ->
    the model output (B, h, w, C) that the scheduler steps on (eps / v / velocity), float32.

    cond is the dict of pipelines/prompts.encode_prompts; jit the returned function."""
    return pipe.spec.apply(pipe)


__all__ = [
    "FAMILIES",
    "PIPELINES",
    "Component",
    "FamilySpec",
    "LatentPipeline",
    "denoiser_apply",
    "load_pipeline",
    "pipeline_options",
    "pipeline_spec",
    "read_model_index",
    "rebuild_scheduler",
    "scheduler_as",
]
