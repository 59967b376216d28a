"""A whole tiny Flux pipeline in JAX vs diffusers' FluxPipeline: prompts -> T5 states and CLIP's
pooled output -> flow-match sampling with dynamic shifting (mu of the packed image tokens,
FluxPipeline's sigmas) on the guidance-embedding transformer (FLUX.1-dev: guidance_scale is its
guidance input), with true CFG (true_cfg_scale and negative prompts) and without, from the same
initial latents -> unpack -> VAE decode with the shift factor; refused folders.

The pipeline is built from random tiny components in tests/tiny_pipelines.py (`build_flux`), saved
with save_pretrained and read back by `load_pipeline`. FluxPipeline takes and returns latents packed
2 x 2; the project's are NHWC (B, h, w, 16 / 4 here), packed only inside the denoiser call.
"""

from __future__ import annotations

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
from fewstep_jax.pipelines.folder import load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from fewstep_jax.pipelines.sampling import flow_match_options, sample  # noqa: E402
from fewstep_jax.schedules.flow_match_scheduler import calculate_shift  # noqa: E402
from tests.tiny_pipelines import FLOW_VAE, T5, build_flux  # noqa: E402

PROMPTS = ["A photo of a CAT", "the cat of the " * 30]
NEGATIVES = ["blurry", ""]
HEIGHT, WIDTH = 16, 24  # pixels: latents 8 x 12 (2 pixels per latent), 4 x 6 packed tokens
C = FLOW_VAE["latent_channels"]
TOL = 1e-3  # the brief's bound for the whole pipeline; measured errors are ~4e-6
# T5 runs unmasked over 512 tokens: float32 rounding in both implementations (each ~1e-5 from
# torch's float64 run, see tests/test_sd3_pipeline.py) puts T5's states ~3e-5 apart on scale 3.5;
# they are held to 1.5e-5 of their scale, CLIP's pooled output (measured 6e-7) to 1e-5 absolute
STATES_TOL = 1e-5


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(saved folder, torch pipeline, JAX pipeline)."""
    folder, ref = build_flux(str(tmp_path_factory.mktemp("flux") / "pipe"))
    return folder, ref, load_pipeline(folder)


@pytest.fixture(scope="module")
def ref_embeds(flux):
    """diffusers' encode_prompt of PROMPTS and of NEGATIVES: ((embeds, pooled, text_ids), (neg, ...))."""
    ref = flux[1]
    with torch.no_grad():
        return ref.encode_prompt(PROMPTS, None, device="cpu"), ref.encode_prompt(
            NEGATIVES, None, device="cpu"
        )


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_loaded_components(flux):
    _, _, pipe = flux
    assert (pipe.family, pipe.pipeline_class) == ("flux", "FluxPipeline")
    assert sorted(pipe.models) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert pipe.tokenizers["tokenizer"].max_length == 77 and pipe.tokenizers["tokenizer_2"].max_length == 512
    assert pipe.scheduler.use_dynamic_shifting and pipe.vae.module.shift_factor
    assert pipe.latent_channels == C and pipe.denoiser.module.in_channels == 4 * C


def test_prompt_embeddings(flux, ref_embeds):
    """text_states (T5) / pooled (CLIP pooler_output) of prompts and negatives vs encode_prompt;
    "guidance" the given scale, the same in both dicts."""
    pipe = flux[2]
    cond, null = encode_prompts(pipe, PROMPTS, NEGATIVES, guidance_scale=4.0)
    assert sorted(cond) == sorted(null) == ["guidance", "pooled", "text_states"]
    assert cond["text_states"].shape == (2, 512, T5["d_model"]) and cond["pooled"].shape == (2, 16)
    np.testing.assert_array_equal(cond["guidance"], [4.0, 4.0])
    np.testing.assert_array_equal(null["guidance"], cond["guidance"])
    np.testing.assert_array_equal(encode_prompts(pipe, PROMPTS)[0]["guidance"], [3.5, 3.5])  # the default
    (embeds, pooled, text_ids), (neg, neg_pooled, _) = ref_embeds
    assert text_ids.shape == (512, 3) and not text_ids.abs().max()  # the zeros the apply builds
    for ours, theirs in ((cond, (embeds, pooled)), (null, (neg, neg_pooled))):
        scale = max(1.0, float(theirs[0].abs().max()))
        assert _err(ours["text_states"], theirs[0]) < 1.5 * STATES_TOL * scale
        assert _err(ours["pooled"], theirs[1]) < STATES_TOL


def test_timesteps(flux):
    """mu of the 24 packed tokens by calculate_shift, and FluxPipeline's sigmas."""
    _, ref, pipe = flux
    opts = flow_match_options(pipe, pipe.scheduler, 3, (HEIGHT // 2, WIDTH // 2))
    assert opts["mu"] == pytest.approx(calculate_shift(24, 256, 4096, 0.5, 1.15), abs=1e-12)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=opts["mu"])
    ts, sigmas = pipe.scheduler.set_timesteps(3, **opts)
    np.testing.assert_array_equal(ts, ref.scheduler.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, ref.scheduler.sigmas.numpy())


@pytest.mark.parametrize(
    "negatives, true_cfg", [(NEGATIVES, 2.0), (None, 1.0)], ids=["true_cfg", "embedded_only"]
)
def test_sampling_matches_pipeline(flux, ref_embeds, negatives, true_cfg):
    """3 steps with embedded guidance 4 (and true CFG 2 with negatives) from the same latents:
    final latents (unpacked), and output_type="np" (with true CFG). diffusers gets its own
    encode_prompt embeddings (test_prompt_embeddings pins ours to them), so it encodes once."""
    _, ref, pipe = flux
    latents = np.random.RandomState(0).randn(2, C, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    packed = ref._pack_latents(torch.tensor(latents), 2, C, HEIGHT // 2, WIDTH // 2)
    (embeds, pooled, _), (neg, neg_pooled, _) = ref_embeds
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, true_cfg_scale=true_cfg, guidance_scale=4.0)
    kw.update(num_inference_steps=3, height=HEIGHT, width=WIDTH)
    if negatives is not None:
        kw.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    args = (pipe, PROMPTS, latents.transpose(0, 2, 3, 1), 3, 4.0, negatives)
    with torch.no_grad():
        ref_latents = ref(latents=packed.clone(), output_type="latent", **kw)[0]
    ref_latents = ref._unpack_latents(ref_latents, HEIGHT, WIDTH, 2).numpy().transpose(0, 2, 3, 1)
    final = np.asarray(sample(*args, output="latent", true_cfg_scale=true_cfg))
    assert _err(final, ref_latents) < TOL * max(1.0, np.abs(ref_latents).max())
    if negatives is not None:
        with torch.no_grad():
            ref_np = ref(latents=packed.clone(), output_type="np", **kw)[0]
        assert _err(sample(*args, output="np", true_cfg_scale=true_cfg), ref_np) < TOL


def test_refused_folders(flux, tmp_path):
    """A VAE whose latent channels do not pack into the transformer's in_channels; odd latents;
    clip_skip (Flux reads CLIP's pooled output)."""
    folder, _, pipe = flux
    folder = str(tmp_path / "copy")
    shutil.copytree(flux[0], folder)
    vae = os.path.join(folder, "vae")
    shutil.rmtree(vae)
    diffusers.AutoencoderKL(**{**FLOW_VAE, "latent_channels": 8}).save_pretrained(vae)
    with pytest.raises(UserError, match=r"in_channels 16 != 4 x vae latent_channels .* \(32\)"):
        load_pipeline(folder)
    with pytest.raises(UserError, match="even height and width"):
        sample(pipe, PROMPTS, np.zeros((2, 7, 12, C), np.float32), 2, 4.0)
    with pytest.raises(UserError, match="clip_skip is not an option of FluxPipeline"):
        encode_prompts(pipe, PROMPTS, clip_skip=1)
