"""Text-to-image sampling with a loaded pipeline folder, as diffusers' pipelines run it.

`sample(pipe, prompts, latents, num_steps, guidance_scale)`: encode the prompts (pipelines/
prompts.py), run the scheduler mirror's loop (`SchedulerConfig.sample` / `FlowMatchConfig.sample`)
on the classifier-free-guided denoiser, decode with the VAE. As diffusers 0.42's
PixArtAlphaPipeline / PixArtSigmaPipeline / StableDiffusionPipeline / StableDiffusionXLPipeline /
StableDiffusion3Pipeline / FluxPipeline `__call__`:
  - guidance when guidance_scale > 1: one network call on the batch [null_cond; cond] (unconditional
    half first), eps = uncond + guidance_scale * (text - uncond);
  - Flux: guidance_scale is the transformer's embedded guidance (cond["guidance"], FLUX.1-dev;
    schnell ignores it, as there), and CFG the same formula with true_cfg_scale, only when
    true_cfg_scale > 1 and negative prompts are given (FluxPipeline's two calls, batched here);
  - the given latents times the scheduler's init_noise_sigma (1 for every mirrored scheduler);
  - flow matching: SD3's timesteps of the folder's scheduler (mu of the image tokens when it shifts
    dynamically), Flux's sigmas linspace(1, 1/N, N) and mu of its packed tokens; the transformer
    gets sigma * 1000 (SD3) or sigma (Flux, inside its denoiser call);
  - Flux's latents are NHWC here, packed 2 x 2 only inside the denoiser call (FluxPipeline's
    `latents` argument and output_type="latent" are the packed tokens: `models.flux.pack_latents`);
  - SDXL's added conditions (pooled, time_ids of the latents' image size) are in cond / null_cond
    and doubled with them; its size conditions are the defaults (original = target = image size,
    crops (0, 0)); other values: build cond["time_ids"] with `prompts.sdxl_time_ids` and run
    `guided` yourself;
  - PixArt-alpha with one step returns the step's predicted x0 (`scheduler.step(...)[1]`);
  - decode(latents / scaling_factor (+ shift_factor)).
Layout is NHWC: latents (B, h, w, C), images (B, h * f, w * f, 3); diffusers' are NCHW.
Not done here: resolution binning (pass latents of the final size; diffusers' use_resolution_binning
resizes the decoded image back), num_images_per_prompt (repeat the prompts), clean_caption, SD's
guidance_rescale (also SDXL's) and safety checker, SDXL's denoising_end, prompt_2 and watermark,
SD3's skip-layer guidance, prompt_2 / prompt_3 and IP-adapter, Flux's prompt_2 and IP-adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.pipelines.folder import DenoiserFn, LatentPipeline, denoiser_apply, scheduler_as
from fewstep_jax.pipelines.prompts import encode_prompts
from fewstep_jax.schedules.ddpm import limit_x0, to_x0_eps
from fewstep_jax.schedules.flow_match_scheduler import FlowMatchConfig, flux_pipeline_sigmas
from fewstep_jax.schedules.scheduler_config import SchedulerConfig

Array = jax.Array
OUTPUTS = ("images", "np", "latent")


def guided(apply: DenoiserFn, guidance: bool) -> Any:
    """jit of fn(params, x (B, h, w, C), timestep scalar, cond, null_cond, scale) -> the guided model
    output: null_cond's and cond's outputs from one call on the doubled batch when `guidance`,
    uncond + scale * (cond - uncond); else the cond output alone."""

    def fn(params: Any, x: Array, timestep: Array, cond: Mapping, null: Mapping, scale: Array) -> Array:
        if not guidance:
            return apply(params, x, jnp.full((x.shape[0],), timestep, jnp.float32), cond)
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), dict(null), dict(cond))
        t = jnp.full((2 * x.shape[0],), timestep, jnp.float32)
        uncond, text = jnp.split(apply(params, jnp.concatenate([x, x]), t, both), 2)
        return uncond + scale * (text - uncond)

    return jax.jit(fn)


@functools.cache
def _guided_for(pipe: LatentPipeline, guidance: bool) -> Any:
    return guided(denoiser_apply(pipe), guidance)


@functools.cache
def _decoder(vae: Any) -> Any:
    from fewstep_jax.models.vae import decode, from_latents

    return jax.jit(lambda params, latents: decode(vae, {"params": params}, from_latents(vae, latents)))


def decode_latents(pipe: LatentPipeline, latents: Array) -> Array:
    """The diffusion model's latents (B, h, w, C) -> VAE images (B, h * f, w * f, 3), nominally in
    [-1, 1], not clipped (diffusers' `vae.decode(latents / scaling_factor)`, + shift_factor)."""
    return _decoder(pipe.vae.module)(pipe.vae.params, jnp.asarray(latents, jnp.float32))


def to_unit_images(images: Array) -> np.ndarray:
    """diffusers' postprocess to output_type="np": clip(images / 2 + 0.5, 0, 1), float32 numpy."""
    return np.asarray(jnp.clip(jnp.asarray(images, jnp.float32) / 2 + 0.5, 0.0, 1.0))


def resolve_scheduler(
    pipe: LatentPipeline, scheduler: SchedulerConfig | FlowMatchConfig | str | None
) -> SchedulerConfig | FlowMatchConfig:
    """None: the pipeline's own (an error saying why when its class is not mirrored); a class name
    or alias ("ddim", ...): the folder's config rebuilt as it; a mirror object: itself."""
    if isinstance(scheduler, (SchedulerConfig, FlowMatchConfig)):
        return scheduler
    if isinstance(scheduler, str):
        return scheduler_as(pipe, scheduler)
    if scheduler is not None:
        raise UserError(f"scheduler must be None, a class name or a scheduler config, got {type(scheduler)}")
    if pipe.scheduler is None:
        raise UserError(f"no scheduler to sample with: {pipe.scheduler_note}")
    return pipe.scheduler


def sample(
    pipe: LatentPipeline,
    prompts: str | Sequence[str],
    latents: Array,
    num_steps: int,
    guidance_scale: float,
    negative_prompts: str | Sequence[str] | None = None,
    scheduler: SchedulerConfig | FlowMatchConfig | str | None = None,
    *,
    eta: float | None = None,
    noises: Any = None,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    output: str = "images",
    true_cfg_scale: float = 1.0,
) -> Array:
    """Images of `prompts` from the initial noise `latents` (B, h, w, C) NHWC, B = len(prompts),
    C = pipe.latent_channels.

    num_steps: the scheduler's inference steps (one guided network call each); guidance_scale:
    CFG scale (<= 1: no guidance, the negative prompts unused), Flux's embedded guidance;
    true_cfg_scale: Flux's CFG scale (with negative prompts); scheduler: see resolve_scheduler;
    eta / noises: the scheduler's stochasticity (DDIM eta, TCD gamma; their injected noise).
    max_sequence_length / clip_skip: encode_prompts' options.
    output: "images" the VAE output (B, H, W, 3) in [-1, 1], not clipped; "np" diffusers'
    output_type="np" ([0, 1], clipped), as numpy; "latent" the final latents (B, h, w, C).
    """
    if output not in OUTPUTS:
        raise UserError(f"output must be one of {OUTPUTS}, got {output!r}")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    x = jnp.asarray(latents, jnp.float32)
    channels = pipe.latent_channels
    if x.ndim != 4 or x.shape[0] != len(texts) or x.shape[-1] != channels:
        raise UserError(
            f"latents must be NHWC ({len(texts)}, h, w, {channels}) for {len(texts)} prompts, got {x.shape}"
        )
    if pipe.family == "flux" and (x.shape[1] % 2 or x.shape[2] % 2):
        raise UserError(f"Flux latents must have an even height and width (packed 2 x 2), got {x.shape}")
    sched = resolve_scheduler(pipe, scheduler)
    f = pipe.vae_scale_factor
    embedded = pipe.spec.embedded_guidance is not None
    if embedded:  # FluxPipeline's do_true_cfg
        cfg_scale = true_cfg_scale if negative_prompts is not None else 1.0
    elif true_cfg_scale != 1.0:
        raise UserError(f"true_cfg_scale is FluxPipeline's; {pipe.pipeline_class} guides with guidance_scale")
    else:
        cfg_scale = guidance_scale
    cond, null = encode_prompts(
        pipe,
        texts,
        negative_prompts,
        image_size=(x.shape[1] * f, x.shape[2] * f),
        max_sequence_length=max_sequence_length,
        clip_skip=clip_skip,
        guidance_scale=guidance_scale if embedded else None,
    )
    guidance = cfg_scale > 1.0
    run = _guided_for(pipe, guidance)
    params, scale = pipe.denoiser.params, jnp.float32(cfg_scale)
    model_fn = lambda xx, t: run(params, xx, jnp.float32(t), cond, null, scale)

    if pipe.spec.one_step_x0 and num_steps == 1 and isinstance(sched, SchedulerConfig):
        x = _one_step_x0(sched, model_fn, x, eta)
    elif isinstance(sched, FlowMatchConfig):
        x = sched.sample(
            model_fn, x, num_steps, noises=noises, **flow_match_options(pipe, sched, num_steps, x.shape[1:3])
        )
    else:
        x = sched.sample(model_fn, x, num_steps, eta=eta, noises=noises)
    if output == "latent":
        return x
    images = decode_latents(pipe, x)
    return to_unit_images(images) if output == "np" else images


def flow_match_options(
    pipe: LatentPipeline, sched: FlowMatchConfig, num_steps: int, latent_size: tuple[int, int]
) -> dict[str, Any]:
    """The pipeline's set_timesteps arguments {"sigmas", "mu"} for latents of `latent_size` (h, w):
    FluxPipeline's sigmas linspace(1, 1/N, N) and, whenever the config shifts dynamically, mu =
    calculate_shift of the image tokens (SD3: patches of the transformer's patch_size; Flux: the
    2 x 2 packed tokens)."""
    mu = sched.mu(pipe.image_tokens(latent_size)) if sched.use_dynamic_shifting else None
    sigmas = flux_pipeline_sigmas(num_steps) if pipe.spec.flux_sigmas else None
    return {"sigmas": sigmas, "mu": mu}


def _one_step_x0(sched: SchedulerConfig, model_fn: Any, x: Array, eta: float | None) -> Array:
    """PixArtAlphaPipeline at num_inference_steps=1 keeps `step(...)[1]`: the step's predicted x0
    (DDIM / DDPM: clipped or thresholded as the step does; LCM's denoised and TCD's pred_noised_sample
    equal the last step's sample)."""
    (t,) = sched.timesteps(1)
    out = model_fn(x, int(t))
    if sched.cls not in ("DDIMScheduler", "DDPMScheduler"):
        return sched.sample(lambda xx, tt: out, x, timesteps=[int(t)], eta=eta)
    abar = jnp.float32(sched.alphas_cumprod()[int(t)])
    x0, _ = to_x0_eps(out, x, abar, sched.prediction_type)
    return limit_x0(x0, sched.x0_limit())


__all__ = [
    "OUTPUTS",
    "decode_latents",
    "flow_match_options",
    "guided",
    "resolve_scheduler",
    "sample",
    "to_unit_images",
]
