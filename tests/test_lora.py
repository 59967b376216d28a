"""LoRA students (fewstep_jax/lora) on a tiny SD pipeline, proved against diffusers + peft.

A tiny StableDiffusionPipeline (tests/tiny_pipelines.py) is loaded in JAX; a LoRA on its UNet's
attention projections and resnet conv1 layers is trained 3 steps of TCD by the project's jitted
train step (the adapters alone in the state, the base the teacher's params), exported, loaded with
``pipe.load_lora_weights(folder)`` and sampled by diffusers' TCDScheduler (gamma 0.3, the same
injected noise) and DDIMScheduler from the same latents: the JAX sample matches to < 1e-3. The
kohya file, the merged pipeline folder and import -> re-export (bit-exact) are checked the same way.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("qwix")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from flax import traverse_util  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.lora import adapters as lora  # noqa: E402
from fewstep_jax.lora.denoisers import (  # noqa: E402
    export_merged_pipeline,
    init_pipeline_adapters,
    load_pipeline_lora,
    lora_student,
    save_pipeline_lora,
    with_adapters,
)
from fewstep_jax.pipelines.denoiser import pipeline_teacher  # noqa: E402
from fewstep_jax.pipelines.folder import load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from fewstep_jax.pipelines.sampling import sample  # noqa: E402
from fewstep_jax.recipes import base  # noqa: E402
from fewstep_jax.train.state import create_state  # noqa: E402
from fewstep_jax.train.step import make_train_step  # noqa: E402
from tests.tiny_pipelines import build_sd  # noqa: E402

PROMPTS = ["a photo of a cat", "two dogs playing in the snow"]
HW = 8  # latents 8 x 8 (16 x 16 pixels)
SPEC = lora.LoraSpec(targets=r".*(to_q|to_k|to_v|to_out_0|resnets_0/conv1)", rank=2, alpha=4.0, convs=True)
TOL = 1e-3


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), HW, HW, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, torch pipeline, JAX pipeline, adapters after 3 TCD steps, first-step adapters)."""
    folder, ref = build_sd(str(tmp_path_factory.mktemp("sd") / "pipe"))
    pipe = load_pipeline(folder)
    cond, null = encode_prompts(pipe, PROMPTS)
    teacher = pipeline_teacher(pipe, jax.tree.map(lambda a: a[:1], null), (HW, HW), scheduler="tcd")
    student = lora_student(pipe, SPEC, teacher.path, form="semilinear", prediction="eps")
    c = base.get_config()
    c.optim.warmup_steps, c.optim.lr, c.train.num_steps = 0, 3e-2, 10
    c.ema.target_decay = 0.95  # TCD's target network
    c.losses.tcd = {"weight": 1.0}
    fresh = init_pipeline_adapters(pipe, SPEC, jax.random.PRNGKey(0))
    state = create_state(c, None, params=jax.tree.map(jnp.copy, fresh))  # the step donates its state
    step = make_train_step(c, student)
    for i in range(3):
        batch = {"x": jnp.asarray(_latents(10 + i)), "noise": jnp.asarray(_latents(20 + i)), "label": cond}
        state, m = step(state, teacher, batch)
        assert np.isfinite(float(m["loss"]))
    return folder, ref, pipe, jax.tree.map(np.asarray, state.params), fresh


def test_state_holds_adapters_only_and_training_moves_them(trained):
    _, _, pipe, adapters, fresh = trained
    paths = traverse_util.flatten_dict(adapters)
    assert paths and all(lora.is_adapter(p) for p in paths)
    assert all(v.dtype == np.float32 for v in paths.values())
    n_layers = len(lora.adapter_layers(adapters))
    # 4 transformer blocks (down, mid, 2 up) x attn1/attn2 x q, k, v, out; resnets_0/conv1 of down, mid, up
    assert n_layers == 4 * 2 * 4 + 3
    # a fresh student is its base exactly (lora_b = 0); three steps moved every lora_b
    assert all(not np.any(b) for _, b in lora.adapter_layers(fresh).values())
    assert all(np.any(b) for _, b in lora.adapter_layers(adapters).values())
    # the base (the teacher's params) is untouched: the pipeline's params are the loaded ones
    reloaded = load_pipeline(pipe.folder).denoiser.params
    for a, b in zip(jax.tree.leaves(pipe.denoiser.params), jax.tree.leaves(reloaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _noises(num_steps: int, seed: int = 0) -> tuple[np.ndarray, torch.Generator]:
    """The noise TCD's step injects (N - 1 draws), as diffusers' generator gives it, NHWC."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(PROMPTS), 4, HW, HW)
    draws = [torch.randn(shape, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(num_steps - 1)]
    return np.stack(draws), torch.Generator().manual_seed(seed)


def _diffusers_sample(ref, folder, latents, scheduler, num_steps, eta, generator=None):
    # the saved config (the in-memory pipeline patched its steps_offset / clip_sample at build)
    ref.scheduler = scheduler.from_config(scheduler.load_config(folder, subfolder="scheduler"))
    out = ref(
        PROMPTS,
        height=2 * HW,
        width=2 * HW,
        num_inference_steps=num_steps,
        guidance_scale=1.0,
        eta=eta,
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
        generator=generator,
        output_type="np",
    )
    return out.images


def test_peft_file_loads_in_diffusers_and_samples_as_jax(trained, tmp_path):
    folder, ref, pipe, adapters, _ = trained
    out = str(tmp_path / "lora")
    path = save_pipeline_lora(out, pipe, adapters, SPEC)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    ref.load_lora_weights(out)
    try:
        latents = _latents(1)
        noises, gen = _noises(4)
        want = _diffusers_sample(ref, folder, latents, diffusers.TCDScheduler, 4, 0.3, gen)
        applied = with_adapters(pipe, adapters, SPEC)
        got = sample(applied, PROMPTS, latents, 4, 1.0, scheduler="tcd", eta=0.3, noises=noises, output="np")
        assert np.abs(got - want).max() < TOL
        merged = with_adapters(pipe, adapters, SPEC, merge=True)
        got_m = sample(merged, PROMPTS, latents, 4, 1.0, scheduler="tcd", eta=0.3, noises=noises, output="np")
        assert np.abs(got_m - want).max() < TOL
        # the LoRA changes the sample (the comparison is not base vs base)
        plain = sample(pipe, PROMPTS, latents, 4, 1.0, scheduler="tcd", eta=0.3, noises=noises, output="np")
        assert np.abs(plain - want).max() > 10 * TOL
        # set_adapters' weight is the same as scaling the update
        ref.set_adapters(["default_0"], [0.5])
        half = _diffusers_sample(ref, folder, latents, diffusers.DDIMScheduler, 2, 0.0)
        got_h = sample(
            with_adapters(pipe, adapters, SPEC, 0.5), PROMPTS, latents, 2, 1.0, scheduler="ddim", output="np"
        )
        assert np.abs(got_h - half).max() < TOL
    finally:
        ref.unload_lora_weights()


def test_kohya_file_loads_in_diffusers(trained, tmp_path):
    folder, ref, pipe, adapters, _ = trained
    out = str(tmp_path / "kohya")
    save_pipeline_lora(out, pipe, adapters, SPEC, layout="kohya", weight_name="tcd_kohya.safetensors")
    keys = safetensors_numpy.load_file(os.path.join(out, "tcd_kohya.safetensors"))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") and k.endswith(".alpha") for k in keys)
    ref.load_lora_weights(out, weight_name="tcd_kohya.safetensors")
    try:
        latents = _latents(2)
        want = _diffusers_sample(ref, folder, latents, diffusers.DDIMScheduler, 3, 0.0)
        got = sample(
            with_adapters(pipe, adapters, SPEC), PROMPTS, latents, 3, 1.0, scheduler="ddim", output="np"
        )
        assert np.abs(got - want).max() < TOL
    finally:
        ref.unload_lora_weights()


def test_import_reexports_bit_exactly(trained, tmp_path):
    _, _, pipe, adapters, _ = trained
    for layout, fold in [("peft", False), ("peft", True), ("kohya", False)]:
        first = save_pipeline_lora(
            str(tmp_path / f"{layout}{fold}"), pipe, adapters, SPEC, layout=layout, fold_alpha=fold
        )
        found = load_pipeline_lora(first, pipe)
        assert found.layout == layout
        again = save_pipeline_lora(
            str(tmp_path / f"{layout}{fold}_again"), pipe, found.adapters, found.specs, layout=layout
        )
        a, b = safetensors_numpy.load_file(first), safetensors_numpy.load_file(again)
        assert sorted(a) == sorted(b)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        if not fold:  # the imported update equals the trained one
            for layer, (la, lb) in lora.adapter_layers(adapters).items():
                fa, fb = lora.adapter_layers(found.adapters)[layer]
                spec = lora.spec_of("/".join(layer[:-1]), found.specs)
                np.testing.assert_allclose(
                    spec.scaling * lora.layer_delta(fa, fb), SPEC.scaling * lora.layer_delta(la, lb)
                )


def test_merged_pipeline_folder_matches_the_lora(trained, tmp_path):
    folder, _, pipe, adapters, _ = trained
    out = export_merged_pipeline(str(tmp_path / "merged"), pipe, adapters, SPEC)
    full = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    full.set_progress_bar_config(disable=True)
    latents = _latents(3)
    want = _diffusers_sample(full, folder, latents, diffusers.DDIMScheduler, 2, 0.0)
    got = sample(with_adapters(pipe, adapters, SPEC), PROMPTS, latents, 2, 1.0, scheduler="ddim", output="np")
    assert np.abs(got - want).max() < TOL
    with pytest.raises(UserError, match="exists"):
        export_merged_pipeline(out, pipe, adapters, SPEC)


def test_bad_input_is_one_clear_line(trained, tmp_path):
    _, _, pipe, adapters, _ = trained
    key = jax.random.PRNGKey(0)
    with pytest.raises(UserError, match="matches no layer"):
        init_pipeline_adapters(pipe, lora.LoraSpec(targets=r".*to_qq"), key)
    with pytest.raises(UserError, match="larger than layer"):
        init_pipeline_adapters(pipe, lora.LoraSpec(rank=64), key)
    with pytest.raises(UserError, match="unknown keys"):
        lora.read_lora_spec({"rnak": 4})
    with pytest.raises(UserError, match="not a regular expression"):
        lora.read_lora_spec({"targets": "(to_q"})
    # a file for another architecture: a layer this UNet does not have
    path = save_pipeline_lora(str(tmp_path / "x"), pipe, adapters, SPEC)
    tensors = safetensors_numpy.load_file(path)
    k = next(iter(tensors))
    tensors[k.replace("down_blocks.0", "down_blocks.7")] = tensors.pop(k)
    safetensors_numpy.save_file(tensors, path)
    with pytest.raises(UserError, match="does not have"):
        load_pipeline_lora(path, pipe)
    with open(path, "wb") as f:
        f.write(b"\x00" * 12)
    with pytest.raises(UserError, match="cannot read LoRA file"):
        load_pipeline_lora(path, pipe)
