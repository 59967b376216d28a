"""Pipeline folders (pipelines/folder.py): model_index.json reading, the family table, the errors
of unsupported / incomplete folders, scheduler rebuilding, and the SD family entry end to end vs
diffusers' StableDiffusionPipeline on a tiny random pipeline (tests/tiny_pipelines.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.pipelines.folder import (  # noqa: E402
    FAMILIES,
    PIPELINES,
    Component,
    load_pipeline,
    pipeline_options,
    pipeline_spec,
    read_model_index,
)
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from fewstep_jax.pipelines.sampling import sample  # noqa: E402
from tests.tiny_pipelines import UNET, build_pixart, build_sd  # noqa: E402


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """(saved PixArt-alpha folder, torch pipeline)."""
    return build_pixart(str(tmp_path_factory.mktemp("pixart") / "pipe"))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(saved StableDiffusionPipeline folder, torch pipeline)."""
    return build_sd(str(tmp_path_factory.mktemp("sd") / "pipe"))


def _copy(folder: str, tmp_path, name: str = "copy") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(folder, dst)
    return dst


def _edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    for key, value in changes.items():
        if value is None:
            data.pop(key)
    with open(path, "w") as f:
        json.dump(data, f)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_read_model_index(tmp_path):
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "text_encoder": [None, None],  # SDXL refiner
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "crop": [0, 0],  # an option that looks like a pair
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert read_model_index(str(tmp_path)) == {
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "unet": ("diffusers", "UNet2DConditionModel"),
    }
    assert pipeline_options(str(tmp_path)) == {"force_zeros_for_empty_prompt": True, "crop": [0, 0]}
    with pytest.raises(UserError, match=r"pipeline folder .* not found"):
        read_model_index(str(tmp_path / "unet"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match=r"not a diffusers pipeline folder: it has no model_index\.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_family_table():
    """One entry per pipeline class: a known family, its denoiser among its components, a loader
    for every accepted component class."""
    families = [spec.family for spec in PIPELINES.values()]
    assert len(set(families)) == len(families) and set(families) <= set(FAMILIES)
    for cls, spec in PIPELINES.items():
        assert spec.denoiser in spec.components and "vae" in spec.components, cls
        assert all(callable(f) for loaders in spec.components.values() for f in loaders.values()), cls
        assert callable(spec.encode) and callable(spec.apply)
    assert pipeline_spec("PixArtAlphaPipeline").max_sequence_length == 120
    assert pipeline_spec("PixArtSigmaPipeline").max_sequence_length == 300
    assert pipeline_spec("StableDiffusionPipeline").family == "sd"
    assert pipeline_spec("StableDiffusion3Pipeline").max_sequence_length == 256  # T5's
    assert pipeline_spec("FluxPipeline").max_sequence_length == 512


def test_unsupported_pipeline_classes(pixart, tmp_path):
    folder = _copy(pixart[0], tmp_path)
    index = os.path.join(folder, "model_index.json")
    _edit_json(index, _class_name="KandinskyV22Pipeline")
    with pytest.raises(UserError, match=r"KandinskyV22Pipeline' is not supported.*PixArtAlphaPipeline"):
        load_pipeline(folder)
    _edit_json(index, _class_name="FluxPipelin")
    with pytest.raises(UserError, match=r"'FluxPipelin' is not supported \(did you mean 'FluxPipeline'\?\)"):
        load_pipeline(folder)


def test_incomplete_folders(pixart, tmp_path):
    """A component missing from model_index, of a class the family cannot load, or missing on disk."""
    folder = _copy(pixart[0], tmp_path)
    index = os.path.join(folder, "model_index.json")
    _edit_json(index, vae=None)
    with pytest.raises(UserError, match="needs the component 'vae'"):
        load_pipeline(folder)
    _edit_json(index, vae=["diffusers", "AutoencoderTiny"])
    with pytest.raises(
        UserError, match=r"'vae' is a AutoencoderTiny; PixArtAlphaPipeline loads \['AutoencoderKL'\]"
    ):
        load_pipeline(folder)
    _edit_json(index, vae=["diffusers", "AutoencoderKL"])
    shutil.rmtree(os.path.join(folder, "vae"))
    with pytest.raises(UserError, match=r"component folder '.*vae' \(AutoencoderKL.*not found"):
        load_pipeline(folder)


def test_pickled_weights_refused(pixart, tmp_path):
    """A component with only .bin weights: an error saying safetensors is needed; the file (not a
    valid pickle here) is never opened."""
    folder = _copy(pixart[0], tmp_path)
    text = os.path.join(folder, "text_encoder")
    os.remove(os.path.join(text, "model.safetensors"))
    with open(os.path.join(text, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(UserError, match=r"no safetensors weights.*pytorch_model\.bin.*never unpickled"):
        load_pipeline(folder)


def test_unmirrored_scheduler_rebuilt(pixart, tmp_path):
    """PixArt's DPMSolverMultistepScheduler is not mirrored: scheduler None with the reason, and
    scheduler="ddim" rebuilds it as DDIMScheduler.from_config does."""
    folder = _copy(pixart[0], tmp_path)
    dpm = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", steps_offset=1)
    dpm.save_config(os.path.join(folder, "scheduler"))
    _edit_json(
        os.path.join(folder, "model_index.json"), scheduler=["diffusers", "DPMSolverMultistepScheduler"]
    )
    pipe = load_pipeline(folder)
    assert pipe.scheduler is None and "DPMSolverMultistepScheduler is not mirrored" in pipe.scheduler_note
    assert isinstance(pipe.models["transformer"], Component)
    with pytest.raises(UserError, match=r"no scheduler to sample with.*scheduler='ddim'"):
        sample(pipe, ["a cat"], np.zeros((1, 8, 8, 4), np.float32), 4, 4.5)

    ddim = load_pipeline(folder, scheduler="ddim").scheduler
    # what a diffusers user gets from the folder: from_pretrained, then from_config
    saved = diffusers.DPMSolverMultistepScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    ref = diffusers.DDIMScheduler.from_config(saved.config)
    assert ddim.cls == "DDIMScheduler"
    for key in ("beta_schedule", "beta_start", "beta_end", "steps_offset", "clip_sample", "timestep_spacing"):
        assert getattr(ddim, key) == ref.config[key], key
    ref.set_timesteps(4)
    np.testing.assert_array_equal(ddim.timesteps(4), ref.timesteps.numpy())
    np.testing.assert_allclose(ddim.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-6)


def test_sigma_entry(pixart, tmp_path):
    """The same components under PixArtSigmaPipeline: 300 tokens and no size conditions, as
    PixArtSigmaPipeline.encode_prompt."""
    folder = _copy(pixart[0], tmp_path)
    _edit_json(os.path.join(folder, "model_index.json"), _class_name="PixArtSigmaPipeline")
    pipe = load_pipeline(folder, dtype="bfloat16")
    assert pipe.family == "pixart_sigma" and pipe.tokenizers["tokenizer"].max_length == 300
    assert {m.module.dtype for m in pipe.models.values()} == {"bfloat16"}
    pipe = load_pipeline(folder)
    prompts = ["A red chair", "two dogs playing in the snow"]
    cond, null = encode_prompts(pipe, prompts, "Low quality")
    assert sorted(cond) == sorted(null) == ["text_mask", "text_states"]
    ref = diffusers.PixArtSigmaPipeline(**pixart[1].components)
    with torch.no_grad():
        embeds, mask, neg, neg_mask = ref.encode_prompt(prompts, True, negative_prompt="Low quality")
    assert cond["text_states"].shape == (2, 300, 32)
    np.testing.assert_array_equal(cond["text_mask"], mask.numpy())
    np.testing.assert_array_equal(null["text_mask"], neg_mask.numpy())
    assert _err(cond["text_states"], embeds) < 1e-5 and _err(null["text_states"], neg) < 1e-5


def test_sd_entry_matches_pipeline(sd):
    """StableDiffusionPipeline: CLIP states (a prompt truncated at 77 tokens), then 4 DDIM steps
    (the folder's scheduler, steps_offset 1 as the pipeline saves it) with guidance 7.5 and
    negative prompts from the same latents: final latents and output_type="np"."""
    folder, ref = sd
    pipe = load_pipeline(folder)
    assert (pipe.family, pipe.denoiser.module.in_channels) == ("sd", 4)
    assert pipe.options == {"requires_safety_checker": False}
    assert pipe.scheduler.steps_offset == 1
    prompts, negatives = ["A photo of a CAT", "the cat of the " * 30], ["blurry", ""]
    cond, null = encode_prompts(pipe, prompts, negatives)
    with torch.no_grad():
        embeds, neg = ref.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
    assert list(cond) == ["text_states"] and cond["text_states"].shape == (2, 77, 32)
    assert _err(cond["text_states"], embeds) < 1e-5 and _err(null["text_states"], neg) < 1e-5

    latents = np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)
    kw = dict(prompt=prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=7.5)
    with torch.no_grad():
        ref_latents = ref(latents=torch.tensor(latents), output_type="latent", **kw)[0].numpy()
        ref_np = ref(latents=torch.tensor(latents), output_type="np", **kw)[0]
    args = (pipe, prompts, latents.transpose(0, 2, 3, 1), 4, 7.5, negatives)
    final = np.asarray(sample(*args, output="latent"))
    # the random UNet's latents reach |17|: the bound is relative to their scale
    assert _err(final, ref_latents.transpose(0, 2, 3, 1)) < 1e-3 * max(1.0, np.abs(ref_latents).max())
    assert _err(sample(*args, output="np"), ref_np) < 1e-3


def test_sd_refuses_lcm_unet(sd, tmp_path):
    """An LCM-distilled UNet (guidance embedding, time_cond_proj_dim) is not the sd family's."""
    folder = _copy(sd[0], tmp_path)
    shutil.rmtree(os.path.join(folder, "unet"))
    diffusers.UNet2DConditionModel(**UNET, time_cond_proj_dim=8).save_pretrained(os.path.join(folder, "unet"))
    with pytest.raises(UserError, match=r"time_cond_proj_dim.*not supported in a StableDiffusionPipeline"):
        load_pipeline(folder)
