"""A whole tiny PixArt-alpha pipeline in JAX vs diffusers' PixArtAlphaPipeline: prompt -> tokens -> T5
states -> DDIM sampling with classifier-free guidance from the same initial latents -> VAE decode.

The pipeline is built from random tiny components in tests/tiny_pipelines.py, saved with
save_pretrained and read back by `load_pipeline`. Its scheduler is a DDIMScheduler: PixArt's
default DPMSolverMultistepScheduler is not mirrored by the project. diffusers is called with
use_resolution_binning=False (its bins are for 256-1024 px images, not 16 x 24) and
clean_caption=False (not implemented here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from fewstep_jax.pipelines.folder import denoiser_apply, load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from fewstep_jax.pipelines.sampling import guided, sample  # noqa: E402
from fewstep_jax.schedules.scheduler_config import scheduler_config  # noqa: E402
from tests.tiny_pipelines import build_pixart  # noqa: E402

# the second prompt runs past PixArt-alpha's 120 tokens (truncated); upper case and outer spaces
# are removed by the pipeline's text preprocessing
PROMPTS = ["  A photo of a Cat sitting on a red chair ", "the quick brown fox jumps over the lazy dog, " * 12]
NEGATIVES = ["low quality", "Blurry, watermark"]
HEIGHT, WIDTH = 16, 24  # pixels: latents 8 x 12 (2 pixels per latent), aspect ratio 2/3
TOL = 1e-3  # the brief's bound for the whole pipeline; measured errors are ~1e-5


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """(torch pipeline, JAX pipeline, initial latents NCHW)."""
    folder, pipe = build_pixart(str(tmp_path_factory.mktemp("pixart") / "pipe"))
    latents = np.random.RandomState(0).randn(2, 4, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    return pipe, load_pipeline(folder), latents


def _nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _call(pipe, latents, **kw):
    with torch.no_grad():
        return pipe(
            latents=torch.tensor(latents),
            height=HEIGHT,
            width=WIDTH,
            use_resolution_binning=False,
            clean_caption=False,
            return_dict=False,
            **kw,
        )[0]


def test_loaded_components(pixart):
    _, jp, _ = pixart
    assert (jp.family, jp.pipeline_class) == ("pixart_alpha", "PixArtAlphaPipeline")
    assert sorted(jp.models) == ["text_encoder", "transformer", "vae"]
    assert list(jp.tokenizers) == ["tokenizer"] and jp.tokenizers["tokenizer"].max_length == 120
    assert jp.scheduler.cls == "DDIMScheduler" and jp.vae_scale_factor == 2


def test_prompt_embeddings_and_mask(pixart):
    pipe, jp, _ = pixart
    cond, null = encode_prompts(jp, PROMPTS, NEGATIVES, image_size=(HEIGHT, WIDTH))
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            PROMPTS, True, negative_prompt=NEGATIVES, clean_caption=False, max_sequence_length=120
        )
    assert cond["text_states"].shape == (2, 120, 32) and null["text_states"].shape == (2, 120, 32)
    np.testing.assert_array_equal(cond["text_mask"], mask.numpy())
    np.testing.assert_array_equal(null["text_mask"], neg_mask.numpy())
    assert int(mask[1].sum()) == 120 and int(mask[0].sum()) < 120  # truncated / padded
    assert _err(cond["text_states"], embeds) < 1e-5
    assert _err(null["text_states"], neg_embeds) < 1e-5
    # __call__'s size conditions (transformer sample_size 128: PixArt-alpha 1024's)
    for c in (cond, null):
        np.testing.assert_array_equal(c["resolution"], [[HEIGHT, WIDTH]] * 2)
        np.testing.assert_allclose(c["aspect_ratio"], [[HEIGHT / WIDTH]] * 2, rtol=1e-7)
    # diffusers' default negative prompt "" for each prompt
    _, default_null = encode_prompts(jp, PROMPTS)
    with torch.no_grad():
        *_, empty, empty_mask = pipe.encode_prompt(PROMPTS, True, clean_caption=False)
    np.testing.assert_array_equal(default_null["text_mask"], empty_mask.numpy())
    assert _err(default_null["text_states"], empty) < 1e-5


def test_denoiser_one_step(pixart):
    """The transformer on the CFG batch [null; cond] at per-row timesteps, first half of the learned
    sigma channels, and the guided output, vs the torch transformer."""
    pipe, jp, _ = pixart
    cond, null = encode_prompts(jp, PROMPTS, NEGATIVES, image_size=(HEIGHT, WIDTH))
    x = np.random.RandomState(1).randn(4, 4, HEIGHT // 2, WIDTH // 2).astype(np.float32)
    t = np.array([999, 500, 250, 0], np.float32)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), null, cond)
    with torch.no_grad():
        ref = pipe.transformer(
            torch.tensor(x),
            encoder_hidden_states=torch.tensor(np.asarray(both["text_states"])),
            encoder_attention_mask=torch.tensor(np.asarray(both["text_mask"])),
            timestep=torch.tensor(t),
            added_cond_kwargs={
                "resolution": torch.tensor([[HEIGHT, WIDTH]] * 4, dtype=torch.float32),
                "aspect_ratio": torch.tensor([[HEIGHT / WIDTH]] * 4, dtype=torch.float32),
            },
            return_dict=False,
        )[0].numpy()
    out = jax.jit(denoiser_apply(jp))(jp.denoiser.params, _nhwc(x), jnp.asarray(t), both)
    assert out.shape == (4, HEIGHT // 2, WIDTH // 2, 4)  # learned sigma dropped
    assert _err(out, _nhwc(ref[:, :4])) < 1e-5

    # guidance at one timestep, the unconditional half first
    xs = _nhwc(x[:2])
    with torch.no_grad():
        ref = pipe.transformer(
            torch.tensor(np.concatenate([x[:2], x[:2]])),
            encoder_hidden_states=torch.tensor(np.asarray(both["text_states"])),
            encoder_attention_mask=torch.tensor(np.asarray(both["text_mask"])),
            timestep=torch.tensor([500] * 4),
            added_cond_kwargs={
                "resolution": torch.tensor([[HEIGHT, WIDTH]] * 4, dtype=torch.float32),
                "aspect_ratio": torch.tensor([[HEIGHT / WIDTH]] * 4, dtype=torch.float32),
            },
            return_dict=False,
        )[0]
        uncond, text = ref.chunk(2)
        ref = (uncond + 4.5 * (text - uncond)).chunk(2, dim=1)[0].numpy()
    g = guided(denoiser_apply(jp), True)(jp.denoiser.params, xs, 500.0, cond, null, 4.5)
    assert _err(g, _nhwc(ref)) < 1e-5


def test_sample_matches_pipeline(pixart):
    """4 DDIM steps, guidance 4.5, negative prompts: final latents, raw decode and output_type="np"."""
    pipe, jp, latents = pixart
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=4.5)
    ref_latents = _call(pipe, latents, output_type="latent", **kw)
    ref_np = _call(pipe, latents, output_type="np", **kw)
    with torch.no_grad():
        ref_raw = pipe.vae.decode(ref_latents / pipe.vae.config.scaling_factor).sample

    args = (jp, PROMPTS, _nhwc(latents), 4, 4.5, NEGATIVES)
    final = sample(*args, output="latent")
    assert _err(final, _nhwc(ref_latents)) < TOL
    raw = sample(*args)
    assert raw.shape == (2, HEIGHT, WIDTH, 3)
    assert _err(raw, _nhwc(ref_raw)) < TOL
    images = sample(*args, output="np")
    assert isinstance(images, np.ndarray) and images.shape == ref_np.shape == (2, HEIGHT, WIDTH, 3)
    assert np.mean((images > 0) & (images < 1)) > 0.02  # not all clipped: the comparison sees values
    assert _err(images, ref_np) < TOL


def test_one_step_no_guidance(pixart):
    """PixArtAlphaPipeline at one step keeps the step's predicted x0 (visible with set_alpha_to_one
    off, where DDIM's prev_sample differs); guidance 1 makes one unguided call; default negatives."""
    pipe, jp, latents = pixart
    ddim = diffusers.DDIMScheduler(set_alpha_to_one=False, timestep_spacing="trailing")
    other = diffusers.PixArtAlphaPipeline(**{**pipe.components, "scheduler": ddim})
    other.set_progress_bar_config(disable=True)
    mine = scheduler_config("ddim", set_alpha_to_one=False, timestep_spacing="trailing")
    for steps, scale in ((1, 1.0), (2, 3.0)):
        ref = _call(
            other,
            latents,
            prompt=PROMPTS,
            num_inference_steps=steps,
            guidance_scale=scale,
            output_type="latent",
        )
        got = sample(jp, PROMPTS, _nhwc(latents), steps, scale, scheduler=mine, output="latent")
        assert _err(got, _nhwc(ref)) < TOL, steps


def test_the_pipelines_teacher_driven_by_the_scheduler_is_the_pipeline(pixart):
    """pipelines.denoiser.pipeline_teacher: the project's Teacher of the loaded pipeline (DDPM path,
    eps; t <-> timestep, CFG with the negative prompts as its null condition) stepped by the same
    DDIM mirror gives diffusers' final latents."""
    from fewstep_jax.pipelines.denoiser import pipeline_teacher

    pipe, jp, latents = pixart
    ref = _call(
        pipe, latents, prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4,
        guidance_scale=4.5, output_type="latent",
    )  # fmt: skip
    x = jnp.asarray(_nhwc(latents))
    cond, null = encode_prompts(jp, PROMPTS, NEGATIVES, image_size=(HEIGHT, WIDTH))
    teacher = pipeline_teacher(jp, null, x.shape[1:3])
    assert teacher.prediction == "eps" and teacher.data_shape == (HEIGHT // 2, WIDTH // 2, 4)
    path = teacher.path
    predict = jax.jit(lambda xx, t: teacher.predict(xx, t, cond, guidance=4.5))
    model_fn = lambda xx, k: predict(xx, jnp.full((xx.shape[0],), path.timestep_to_t(k)))
    final = jp.scheduler.sample(model_fn, x, 4)
    assert _err(final, _nhwc(ref)) < TOL
