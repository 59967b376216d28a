"""Tiny random diffusers pipeline folders for the pipeline tests (nothing downloads).

`build_sd(folder)` builds a StableDiffusionPipeline the same way: UNet2DConditionModel (32
channels, one cross-attention block), the AutoencoderKL below, CLIPTextModel (width 32, 2 layers)
and a CLIPTokenizer on a byte-level vocabulary with a few merges, a DDIMScheduler, no safety
checker.

`build_sdxl(folder)` builds a StableDiffusionXLPipeline: two CLIP text encoders (the second
WithProjection) and tokenizers (the second padding with "!"), a text_time UNet, the same VAE, an
unclipped DDIMScheduler (SDXL's EulerDiscreteScheduler is not mirrored), no watermarker.

`build_pixart(folder, sigma=False)` builds a PixArtAlphaPipeline (or PixArtSigmaPipeline) from
random tiny components: PixArtTransformer2DModel (width 24, 1 layer, learned sigma), AutoencoderKL
(2 blocks: 2 pixels per latent), T5EncoderModel (gated-gelu, 2 layers), a T5 tokenizer on a unigram
sentencepiece model trained here, and a DDIMScheduler; saves it with `save_pretrained` and returns
(folder, torch pipeline). The alpha transformer has sample_size 128, so PixArtAlphaPipeline passes
the resolution / aspect-ratio conditions, as for PixArt-alpha 1024; the Sigma one has none.

`build_sd3(folder)` builds a StableDiffusion3Pipeline (two CLIPTextModelWithProjection, a T5
encoder, SD3Transformer2DModel with 2 blocks, a VAE with a shift factor and no quant convs, the
flow-match scheduler with shift 3) and `build_flux(folder)` a FluxPipeline (CLIPTextModel, T5, a
FluxTransformer2DModel with the guidance embedding, the same VAE, FLUX.1's dynamic-shifting
scheduler config); both save with `save_pretrained` and return (folder, torch pipeline).

transformers 5's `save_pretrained` writes tokenizer.json only; the project's T5 tokenizer reads
`spiece.model`, which the released PixArt / SD3 / Flux folders ship, so it is copied into the T5
tokenizer's folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import torch

CORPUS = [
    "a photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon, digital art",
    "the quick brown fox jumps over the lazy dog",
    "low quality, blurry, watermark",
    "a watercolor painting of a lighthouse at dusk",
    "two dogs playing in the snow",
    "a bowl of ramen with eggs and green onions",
    "sunset over the mountains, golden hour",
]
T5 = {
    "d_model": 32,
    "d_kv": 8,
    "num_heads": 4,
    "d_ff": 37,
    "num_layers": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
}
VAE = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": 16,
}
TRANSFORMER = {
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "caption_channels": T5["d_model"],
    "cross_attention_dim": 24,
}


def train_spiece(path: str) -> None:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def _perturb(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random offsets on every weight, so zero-initialised parts and norm scales count."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def t5_tokenizer(source: str):
    """(transformers T5Tokenizer, path of its spiece.model) of a tokenizer folder written at
    `source` as the released pipelines ship it: spiece.model + tokenizer_config.json."""
    import transformers

    os.makedirs(source, exist_ok=True)
    spiece = os.path.join(source, "spiece.model")
    train_spiece(spiece)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "extra_ids": 0, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}, f)
    return transformers.T5Tokenizer.from_pretrained(source), spiece


def t5_encoder(tokenizer):
    """A random T5EncoderModel of the `T5` config above for `tokenizer`'s vocabulary."""
    import transformers

    return _perturb(transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), **T5)), 0.1)


def build_pixart(folder: str, *, sigma: bool = False, seed: int = 0):
    """(folder, torch pipeline) of a tiny PixArt-alpha (or Sigma) pipeline saved into `folder`."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, spiece = t5_tokenizer(folder + "_spiece")
    text_encoder = t5_encoder(tokenizer)
    vae = _perturb(diffusers.AutoencoderKL(**VAE), 0.1)
    if sigma:
        tcfg = {
            **TRANSFORMER,
            "sample_size": 16,
            "use_additional_conditions": False,
            "interpolation_scale": 2,
        }
    else:
        tcfg = {**TRANSFORMER, "sample_size": 128}
    transformer = _perturb(diffusers.PixArtTransformer2DModel(**tcfg), 0.05)
    scheduler = diffusers.DDIMScheduler()
    cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copy(spiece, os.path.join(folder, "tokenizer", "spiece.model"))
    return folder, pipe


UNET = {  # one cross-attention block and the cross-attention mid block: the smallest SD-shaped UNet
    "block_out_channels": (32,),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D",),
    "up_block_types": ("CrossAttnUpBlock2D",),
    "attention_head_dim": 4,
}
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MERGES = [("a", "t</w>"), ("c", "at</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]


def clip_tokenizer_folder(folder: str) -> str:
    """vocab.json + merges.txt + tokenizer_config.json of a CLIP BPE tokenizer: the byte alphabet,
    each byte with "</w>", a few merges, bos / eos (SD 1.5's layout: pad is eos, 77 tokens)."""
    import tokenizers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in CLIP_MERGES), CLIP_BOS, CLIP_EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    config = {
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def clip_tokenizers(folder: str, count: int) -> list:
    """`count` transformers CLIPTokenizers on the vocabulary above; the second pads with "!" (as
    SDXL's and SD3's tokenizer_2 do), the first with eos."""
    import transformers

    return [
        transformers.CLIPTokenizer.from_pretrained(
            clip_tokenizer_folder(f"{folder}_clip{i + 1 if i else ''}"), **({"pad_token": "!"} if i else {})
        )
        for i in range(count)
    ]


def clip_config(tokenizer, **options):
    """A 2-layer CLIPTextConfig on `tokenizer`'s vocabulary and special ids, with `options`
    (hidden_size, num_attention_heads, projection_dim, hidden_act, ...)."""
    import transformers

    return transformers.CLIPTextConfig(
        **{
            "vocab_size": len(tokenizer),
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **options,
        }
    )


def build_sd(folder: str, *, seed: int = 0):
    """(folder, torch pipeline) of a tiny StableDiffusionPipeline saved into `folder`."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_folder(folder + "_clip"))
    text_config = clip_config(tokenizer, hidden_size=32, num_attention_heads=4)
    text_encoder = _perturb(transformers.CLIPTextModel(text_config), 0.1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_perturb(diffusers.AutoencoderKL(**VAE), 0.1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_perturb(diffusers.UNet2DConditionModel(**UNET), 0.05),
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


SDXL_UNET = {  # SDXL's shape at its smallest: text_time added embedding, linear projections
    "block_out_channels": (32,),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D",),
    "up_block_types": ("CrossAttnUpBlock2D",),
    "attention_head_dim": 4,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
}
SDXL_CLIP = ({"hidden_size": 32, "num_attention_heads": 4}, {"hidden_size": 24, "num_attention_heads": 2})
SDXL_PROJECTION_DIM = 16


def build_sdxl(folder: str, *, seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """(folder, torch pipeline) of a tiny StableDiffusionXLPipeline saved into `folder`:
    CLIPTextModel (width 32) + CLIPTextModelWithProjection (width 24, gelu, projection 16), two
    CLIP tokenizers (the second pads with "!", as SDXL's), a UNet with cross_attention_dim 32 + 24
    and projection_class_embeddings_input_dim 6 * 8 + 16, the VAE above, a DDIMScheduler (SDXL
    folders ship EulerDiscreteScheduler, which the project does not mirror), no watermark."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizers(folder, 2)

    def config(i: int) -> transformers.CLIPTextConfig:
        act = "quick_gelu" if i == 0 else "gelu"
        return clip_config(tokenizer, projection_dim=SDXL_PROJECTION_DIM, hidden_act=act, **SDXL_CLIP[i])

    text_encoder = _perturb(transformers.CLIPTextModel(config(0)), 0.1)
    text_encoder_2 = _perturb(transformers.CLIPTextModelWithProjection(config(1)), 0.1)
    unet = diffusers.UNet2DConditionModel(
        **SDXL_UNET,
        cross_attention_dim=sum(c["hidden_size"] for c in SDXL_CLIP),
        projection_class_embeddings_input_dim=6 * SDXL_UNET["addition_time_embed_dim"] + SDXL_PROJECTION_DIM,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_perturb(diffusers.AutoencoderKL(**VAE), 0.1),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_perturb(unet, 0.05),
        # unclipped x0 (SDXL's Euler does not clip), so the final latents are the model's
        scheduler=diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
        ),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


# SD3 / Flux: VAEs with a shift factor and no quant convs, as theirs (4 latent channels here)
FLOW_VAE = {
    **VAE,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# CLIP-L (quick_gelu) and CLIP-G (gelu) of SD3: widths 12 + 16 < T5's 32 (the CLIP states are padded)
SD3_CLIP = (
    {"hidden_size": 12, "num_attention_heads": 2, "projection_dim": 8, "hidden_act": "quick_gelu"},
    {"hidden_size": 16, "num_attention_heads": 2, "projection_dim": 12, "hidden_act": "gelu"},
)
SD3_TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": T5["d_model"],
    "caption_projection_dim": 16,
    "pooled_projection_dim": sum(c["projection_dim"] for c in SD3_CLIP),
    "pos_embed_max_size": 16,
}


def build_sd3(folder: str, *, seed: int = 0):
    """(folder, torch pipeline) of a tiny StableDiffusion3Pipeline saved into `folder`: two
    CLIPTextModelWithProjection (SD3_CLIP) and CLIP tokenizers (the second pads with "!"), a T5
    encoder and tokenizer, SD3Transformer2DModel (2 blocks, width 16), FLOW_VAE, and a
    FlowMatchEulerDiscreteScheduler with SD3's shift 3."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizers(folder, 2)
    t5_tok, spiece = t5_tokenizer(folder + "_spiece")
    encoders = [
        _perturb(transformers.CLIPTextModelWithProjection(clip_config(tokenizer, **c)), 0.1) for c in SD3_CLIP
    ]
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_perturb(diffusers.SD3Transformer2DModel(**SD3_TRANSFORMER), 0.05),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_perturb(diffusers.AutoencoderKL(**FLOW_VAE), 0.1),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(t5_tok),
        tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copy(spiece, os.path.join(folder, "tokenizer_3", "spiece.model"))
    return folder, pipe


FLUX_CLIP = {"hidden_size": 16, "num_attention_heads": 2}
FLUX_TRANSFORMER = {  # FLUX.1-dev's shape at its smallest: guidance embedding, 3 rope axes
    "patch_size": 1,
    "in_channels": 4 * FLOW_VAE["latent_channels"],
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": T5["d_model"],
    "pooled_projection_dim": FLUX_CLIP["hidden_size"],
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
# FLUX.1's scheduler_config.json
FLUX_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_flux(folder: str, *, seed: int = 0):
    """(folder, torch pipeline) of a tiny FluxPipeline saved into `folder`: CLIPTextModel (width 16)
    and CLIP tokenizer, a T5 encoder and tokenizer, FluxTransformer2DModel (FLUX_TRANSFORMER: one
    double and one single block, guidance embedding), FLOW_VAE, FLUX.1's flow-match scheduler."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    (tokenizer,) = clip_tokenizers(folder, 1)
    t5_tok, spiece = t5_tokenizer(folder + "_spiece")
    pipe = diffusers.FluxPipeline(
        transformer=_perturb(diffusers.FluxTransformer2DModel(**FLUX_TRANSFORMER), 0.05),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_perturb(diffusers.AutoencoderKL(**FLOW_VAE), 0.1),
        text_encoder=_perturb(transformers.CLIPTextModel(clip_config(tokenizer, **FLUX_CLIP)), 0.1),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copy(spiece, os.path.join(folder, "tokenizer_2", "spiece.model"))
    return folder, pipe
