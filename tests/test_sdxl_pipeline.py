"""A whole tiny SDXL pipeline in JAX vs diffusers' StableDiffusionXLPipeline: prompts -> both CLIP
encoders' states, encoder 2's pooled projection and the size time ids -> DDIM sampling with
classifier-free guidance from the same initial latents -> VAE decode; with negative prompts and
without (force_zeros_for_empty_prompt: zero negative embeddings).

The pipeline is built from random tiny components in tests/tiny_pipelines.py (`build_sdxl`), saved
with save_pretrained and read back by `load_pipeline`. Its scheduler is a DDIMScheduler (unclipped):
SDXL folders ship EulerDiscreteScheduler, which the project does not mirror.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.pipelines.folder import load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts, sdxl_time_ids  # noqa: E402
from fewstep_jax.pipelines.sampling import sample  # noqa: E402
from tests.tiny_pipelines import SDXL_UNET, build_sdxl  # noqa: E402

# the second prompt runs past CLIP's 77 tokens (truncated)
PROMPTS = ["A photo of a CAT", "the cat of the " * 30]
NEGATIVES = ["blurry", ""]
HEIGHT, WIDTH = 16, 24  # pixels: latents 8 x 12 (2 pixels per latent)
TOL = 1e-3  # the brief's bound for the whole pipeline; measured errors are ~4e-5


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(saved folder, torch pipeline, JAX pipeline)."""
    folder, ref = build_sdxl(str(tmp_path_factory.mktemp("sdxl") / "pipe"))
    return folder, ref, load_pipeline(folder)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _copy(folder: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(folder, dst)
    return dst


def _edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def test_loaded_components(sdxl):
    _, _, pipe = sdxl
    assert (pipe.family, pipe.pipeline_class) == ("sdxl", "StableDiffusionXLPipeline")
    assert sorted(pipe.models) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert sorted(pipe.tokenizers) == ["tokenizer", "tokenizer_2"]
    assert pipe.options == {"force_zeros_for_empty_prompt": True}
    assert pipe.scheduler.cls == "DDIMScheduler" and pipe.vae_scale_factor == 2
    # tokenizer_2 pads with "!" (id 0 of the byte alphabet's sorted order here), tokenizer with eos
    tok, tok2 = pipe.tokenizers["tokenizer"], pipe.tokenizers["tokenizer_2"]
    assert tok2.pad_id != tok.pad_id == tok.eos_id


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negatives", "zeros"])
def test_prompt_embeddings(sdxl, negatives):
    """text_states / pooled of both branches vs encode_prompt; time_ids vs _get_add_time_ids."""
    _, ref, pipe = sdxl
    cond, null = encode_prompts(pipe, PROMPTS, negatives, image_size=(HEIGHT, WIDTH))
    assert sorted(cond) == sorted(null) == ["pooled", "text_states", "time_ids"]
    assert cond["text_states"].shape == (2, 77, 32 + 24) and cond["pooled"].shape == (2, 16)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = ref.encode_prompt(
            PROMPTS,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
        )
    if negatives is None:  # the zeros rule
        assert not neg.abs().max() and not np.abs(np.asarray(null["text_states"])).max()
    assert _err(cond["text_states"], embeds) < 1e-5 and _err(null["text_states"], neg) < 1e-5
    assert _err(cond["pooled"], pooled) < 1e-5 and _err(null["pooled"], neg_pooled) < 1e-5
    ids = ref._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), torch.float32, 16).numpy()
    np.testing.assert_array_equal(cond["time_ids"], np.repeat(ids, 2, 0))
    np.testing.assert_array_equal(null["time_ids"], cond["time_ids"])
    crop = ref._get_add_time_ids((32, 48), (4, 2), (HEIGHT, WIDTH), torch.float32, 16).numpy()
    np.testing.assert_array_equal(sdxl_time_ids(1, (32, 48), (4, 2), (HEIGHT, WIDTH)), crop)


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negatives", "zeros"])
def test_sampling_matches_pipeline(sdxl, negatives):
    """4 DDIM steps with guidance 5 from the same latents: final latents, and output_type="np"."""
    _, ref, pipe = sdxl
    latents = np.random.RandomState(0).randn(2, 4, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=4, guidance_scale=5.0)
    kw.update(height=HEIGHT, width=WIDTH)  # the time ids of the latents' size (diffusers defaults to 16 x 16)
    with torch.no_grad():
        ref_latents = ref(latents=torch.tensor(latents), output_type="latent", **kw)[0].numpy()
        ref_np = ref(latents=torch.tensor(latents), output_type="np", **kw)[0]
    args = (pipe, PROMPTS, latents.transpose(0, 2, 3, 1), 4, 5.0, negatives)
    final = np.asarray(sample(*args, output="latent"))
    assert _err(final, ref_latents.transpose(0, 2, 3, 1)) < TOL * max(1.0, np.abs(ref_latents).max())
    assert _err(sample(*args, output="np"), ref_np) < TOL


def test_force_zeros_off(sdxl, tmp_path):
    """force_zeros_for_empty_prompt false: no negatives encode "" like the pipeline does."""
    folder, ref, _ = sdxl
    folder = _copy(folder, tmp_path)
    _edit_json(os.path.join(folder, "model_index.json"), force_zeros_for_empty_prompt=False)
    pipe = load_pipeline(folder)
    other = diffusers.StableDiffusionXLPipeline(
        **ref.components, force_zeros_for_empty_prompt=False, add_watermarker=False
    )
    _, null = encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        _, neg, _, neg_pooled = other.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert float(neg.abs().max()) > 0.1
    assert _err(null["text_states"], neg) < 1e-5 and _err(null["pooled"], neg_pooled) < 1e-5


def test_refused_folders(sdxl, tmp_path):
    """A UNet without the text_time embedding, one whose added-embedding width is not 6 time ids +
    the projection, a VAE with latents_mean, and encoder 2 alone against a UNet for both."""
    folder = _copy(sdxl[0], tmp_path)
    unet = os.path.join(folder, "unet")

    def save_unet(**cfg):
        shutil.rmtree(unet)
        diffusers.UNet2DConditionModel(**cfg).save_pretrained(unet)

    base = {**SDXL_UNET, "cross_attention_dim": 56}
    save_unet(**{**base, "addition_embed_type": None})
    with pytest.raises(UserError, match=r"addition_embed_type.*not supported in a StableDiffusionXLPipeline"):
        load_pipeline(folder)
    save_unet(**base, projection_class_embeddings_input_dim=6 * 8 + 4)
    with pytest.raises(UserError, match=r"projection_class_embeddings_input_dim 52 != .* = 64"):
        load_pipeline(folder)
    save_unet(**base, projection_class_embeddings_input_dim=6 * 8 + 16)
    load_pipeline(folder)  # the original shape loads again

    vae_config = os.path.join(folder, "vae", "config.json")
    _edit_json(vae_config, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(UserError, match="latents_mean / latents_std are not supported"):
        load_pipeline(folder)
    _edit_json(vae_config, latents_mean=None, latents_std=None)

    _edit_json(os.path.join(folder, "model_index.json"), text_encoder=[None, None], tokenizer=[None, None])
    with pytest.raises(UserError, match=r"cross_attention_dim 56 != the text encoders' widths summed \(24\)"):
        load_pipeline(folder)


def test_sd_family_refuses_text_time(sdxl, tmp_path):
    """The SDXL UNet under StableDiffusionPipeline is still refused (it needs pooled / time_ids)."""
    folder = _copy(sdxl[0], tmp_path)
    _edit_json(os.path.join(folder, "model_index.json"), _class_name="StableDiffusionPipeline")
    with pytest.raises(UserError, match=r"addition_embed_type.*not supported in a StableDiffusionPipeline"):
        load_pipeline(folder)
