"""A whole tiny SD3 pipeline in JAX vs diffusers' StableDiffusion3Pipeline: prompts -> both CLIP
encoders' penultimate states (padded to T5's width) + T5 states on the sequence axis, both pooled
projections -> flow-match sampling with classifier-free guidance from the same initial latents ->
VAE decode with the shift factor; with negative prompts and without ("" encoded, not zeros); a
folder without text_encoder_3 (zero T5 states); refused folders.

The pipeline is built from random tiny components in tests/tiny_pipelines.py (`build_sd3`), saved
with save_pretrained and read back by `load_pipeline`.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.pipelines.folder import load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from fewstep_jax.pipelines.sampling import sample  # noqa: E402
from fewstep_jax.schedules.flow_match_scheduler import FlowMatchConfig  # noqa: E402
from tests.tiny_pipelines import T5, build_sd3  # noqa: E402

# the second prompt runs past CLIP's 77 tokens (truncated there, not in T5's 256)
PROMPTS = ["A photo of a CAT", "the cat of the " * 30]
NEGATIVES = ["blurry", ""]
HEIGHT, WIDTH = 16, 24  # pixels: latents 8 x 12 (2 pixels per latent)
TOL = 1e-3  # the brief's bound for the whole pipeline; measured errors are ~3e-6
# T5 runs unmasked over 256 tokens: this project's float32 states and torch's float32 ones are each
# ~1e-5 from torch's float64 run (measured 1.2e-5 and 8e-6 on scale 4), so T5's part is held to
# 1e-5 of its scale and CLIP's parts (measured ~1e-6) to 1e-5 absolute
STATES_TOL = 1e-5


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(saved folder, torch pipeline, JAX pipeline)."""
    folder, ref = build_sd3(str(tmp_path_factory.mktemp("sd3") / "pipe"))
    return folder, ref, load_pipeline(folder)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _check_states(ours, ref) -> None:
    """CLIP's 77 rows (and their zero padding) absolute, T5's rows relative to their scale."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert _err(ours[:, :77], ref[:, :77]) < STATES_TOL
    assert _err(ours[:, 77:], ref[:, 77:]) < STATES_TOL * max(1.0, np.abs(ref[:, 77:]).max())


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


def test_loaded_components(sd3):
    _, _, pipe = sd3
    assert (pipe.family, pipe.pipeline_class) == ("sd3", "StableDiffusion3Pipeline")
    assert sorted(pipe.models) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    assert sorted(pipe.tokenizers) == ["tokenizer", "tokenizer_2", "tokenizer_3"]
    assert pipe.scheduler.cls == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.shift == 3.0
    assert pipe.vae.module.shift_factor and pipe.latent_channels == 4 and pipe.vae_scale_factor == 2
    # CLIP at its model_max_length, T5 at the family's 256
    assert (
        pipe.tokenizers["tokenizer_2"].max_length == 77 and pipe.tokenizers["tokenizer_3"].max_length == 256
    )


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negatives", "empty"])
def test_prompt_embeddings(sd3, negatives):
    """text_states / pooled of both branches vs encode_prompt (negatives None: "" encoded)."""
    _, ref, pipe = sd3
    cond, null = encode_prompts(pipe, PROMPTS, negatives)
    assert sorted(cond) == sorted(null) == ["pooled", "text_states"]
    assert cond["text_states"].shape == (2, 77 + 256, T5["d_model"]) and cond["pooled"].shape == (2, 8 + 12)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = ref.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=negatives
        )
    if negatives is None:  # "" encoded, not zeros
        assert float(neg.abs().max()) > 0.1
    _check_states(cond["text_states"], embeds)
    _check_states(null["text_states"], neg)
    assert _err(cond["pooled"], pooled) < STATES_TOL and _err(null["pooled"], neg_pooled) < STATES_TOL
    # the CLIP states (12 + 16 wide) are zero-padded to T5's 32
    assert not np.abs(np.asarray(cond["text_states"])[:, :77, 28:]).max()


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negatives", "empty"])
def test_sampling_matches_pipeline(sd3, negatives):
    """3 flow-match steps (shift 3) with guidance 5 from the same latents: final latents, and
    output_type="np" (decoded with scaling and shift factors)."""
    _, ref, pipe = sd3
    latents = np.random.RandomState(0).randn(2, 4, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=3, guidance_scale=5.0)
    with torch.no_grad():
        ref_latents = ref(latents=torch.tensor(latents), output_type="latent", **kw)[0].numpy()
        ref_np = ref(latents=torch.tensor(latents), output_type="np", **kw)[0]
    args = (pipe, PROMPTS, latents.transpose(0, 2, 3, 1), 3, 5.0, negatives)
    final = np.asarray(sample(*args, output="latent"))
    assert _err(final, ref_latents.transpose(0, 2, 3, 1)) < TOL * max(1.0, np.abs(ref_latents).max())
    assert _err(sample(*args, output="np"), ref_np) < TOL


def test_dynamic_shifting(sd3):
    """A dynamic-shifting scheduler: mu of the (8 / 2) x (12 / 2) = 24 image tokens, as the
    pipeline's calculate_shift (token bounds 8 and 64 here, so that mu moves)."""
    _, ref, pipe = sd3
    options = dict(use_dynamic_shifting=True, base_image_seq_len=8, max_image_seq_len=64)
    other = diffusers.StableDiffusion3Pipeline(
        **{**ref.components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**options)}
    )
    other.set_progress_bar_config(disable=True)
    assert pipe.image_tokens((HEIGHT // 2, WIDTH // 2)) == 24
    latents = np.random.RandomState(1).randn(2, 4, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0)
    with torch.no_grad():
        want = other(latents=torch.tensor(latents), output_type="latent", **kw)[0].numpy()
    got = sample(
        pipe,
        PROMPTS,
        latents.transpose(0, 2, 3, 1),
        3,
        5.0,
        NEGATIVES,
        FlowMatchConfig(**options),
        output="latent",
    )
    assert _err(got, want.transpose(0, 2, 3, 1)) < TOL * max(1.0, np.abs(want).max())


def test_without_t5(sd3, tmp_path):
    """text_encoder_3 / tokenizer_3 null in model_index: zero T5 states, as the pipeline built
    without them."""
    folder, ref, _ = sd3
    folder = _copy(folder, tmp_path)
    _edit_json(
        os.path.join(folder, "model_index.json"), text_encoder_3=[None, None], tokenizer_3=[None, None]
    )
    pipe = load_pipeline(folder)
    assert "text_encoder_3" not in pipe.models and "tokenizer_3" not in pipe.tokenizers
    other = diffusers.StableDiffusion3Pipeline(
        **{**ref.components, "text_encoder_3": None, "tokenizer_3": None}
    )
    cond, null = encode_prompts(pipe, PROMPTS, NEGATIVES)
    with torch.no_grad():
        embeds, neg, *_ = other.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=NEGATIVES)
    assert not np.abs(np.asarray(cond["text_states"])[:, 77:]).max()
    assert _err(cond["text_states"], embeds) < STATES_TOL and _err(null["text_states"], neg) < STATES_TOL


def test_refused_folders(sd3, tmp_path):
    """A T5 narrower than the transformer's joint_attention_dim, a CLIPTextModel without the
    projection SD3 pools; Flux's guidance options for the CFG family (the VAE's latents_mean
    refusal is the SDXL family's check, tests/test_sdxl_pipeline.py)."""
    folder = _copy(sd3[0], tmp_path)
    t5_dir = os.path.join(folder, "text_encoder_3")
    shutil.move(t5_dir, t5_dir + "_saved")
    config = transformers.T5Config(vocab_size=120, **{**T5, "d_model": 24})
    transformers.T5EncoderModel(config).save_pretrained(t5_dir)
    with pytest.raises(UserError, match=r"joint_attention_dim 32 != text_encoder_3 d_model \(24\)"):
        load_pipeline(folder)
    shutil.rmtree(t5_dir)
    shutil.move(t5_dir + "_saved", t5_dir)

    index = os.path.join(folder, "model_index.json")
    _edit_json(index, text_encoder=["transformers", "CLIPTextModel"])
    with pytest.raises(
        UserError, match=r"'text_encoder' is a CLIPTextModel; .* \['CLIPTextModelWithProjection'\]"
    ):
        load_pipeline(folder)
    _edit_json(index, text_encoder=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(UserError, match="guidance_scale is the guidance input"):
        encode_prompts(sd3[2], PROMPTS, guidance_scale=3.5)
    with pytest.raises(UserError, match="true_cfg_scale is FluxPipeline's"):
        sample(sd3[2], PROMPTS, np.zeros((2, 8, 12, 4), np.float32), 2, 5.0, true_cfg_scale=2.0)
