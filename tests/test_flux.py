"""FluxTransformer2D vs diffusers' FluxTransformer2DModel on tiny random configs (FLUX.1-dev-like with
the guidance embedding, schnell-like without), and the packing helpers vs FluxPipeline's."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.flux import (  # noqa: E402
    flux_rotary,
    flux_to_torch,
    latent_image_ids,
    load_flux_transformer,
    pack_latents,
    unpack_latents,
)

B, L, JOINT, POOLED, C = 2, 5, 16, 12, 4
H, W = 6, 8  # latent size: a 3 x 4 grid of packed tokens
TINY = {
    "patch_size": 1,
    "in_channels": 4 * C,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": JOINT,
    "pooled_projection_dim": POOLED,
    "axes_dims_rope": (2, 2, 4),
}
CONFIGS = {"dev": {**TINY, "guidance_embeds": True}, "schnell": {**TINY, "guidance_embeds": False}}


def _perturb(model) -> None:
    """Zero-free random weights everywhere (norm weights are ones, biases zeros at init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (saved transformer folder, torch model, (module, params) loaded from the folder)}."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = diffusers.FluxTransformer2DModel(**cfg).eval()
        _perturb(model)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, model, load_flux_transformer(folder))
    return out


def _inputs(name: str) -> tuple[dict, dict]:
    """(torch kwargs, JAX kwargs) of the same random inputs; text ids nonzero so the text rope counts."""
    rng = np.random.RandomState(1)
    latents = rng.randn(B, H, W, C).astype(np.float32)
    x = np.asarray(pack_latents(latents))
    ctx = rng.randn(B, L, JOINT).astype(np.float32)
    pooled = rng.randn(B, POOLED).astype(np.float32)
    img_ids = latent_image_ids(H // 2, W // 2)
    txt_ids = rng.randint(0, 7, size=(L, 3)).astype(np.float32)
    t = np.array([0.03, 0.91], np.float32)
    guidance = np.array([3.5, 1.0], np.float32) if CONFIGS[name]["guidance_embeds"] else None
    jk = {
        "hidden_states": x,
        "timestep": t,
        "encoder_hidden_states": ctx,
        "pooled_projections": pooled,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": guidance,
    }
    tk = {k: None if v is None else torch.tensor(v) for k, v in jk.items()}
    return tk, jk


def _reference(model, tk) -> np.ndarray:
    with torch.no_grad():
        return model(**tk).sample.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(models, name):
    _, model, (module, params) = models[name]
    tk, jk = _inputs(name)
    ref = _reference(model, tk)
    out = np.asarray(jax.jit(lambda p, kw: module.apply({"params": p}, **kw))(params, jk))
    assert out.shape == (B, (H // 2) * (W // 2), 4 * C) and out.dtype == np.float32
    assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()


def test_rotary_matches_flux_pos_embed():
    """FluxPosEmbed at FLUX.1's axes and positions up to 127: concrete ids exactly (float64 as
    diffusers), traced ids in float32 within 1e-4."""
    ids = np.random.RandomState(4).randint(0, 128, size=(40, 3)).astype(np.float32)
    want = [a.numpy() for a in FluxPosEmbed(10000, [16, 56, 56])(torch.tensor(ids))]
    for got in (flux_rotary(ids, (16, 56, 56)), jax.jit(lambda i: flux_rotary(i, (16, 56, 56)))(ids)):
        assert all(np.abs(np.asarray(g) - w).max() < 1e-4 for g, w in zip(got, want))
    np.testing.assert_array_equal(np.asarray(flux_rotary(ids, (16, 56, 56))[1]), want[1])


def test_bf16(models):
    """bf16 compute (params stay float32) within 5% of the output scale."""
    folder, model, _ = models["dev"]
    module, params = load_flux_transformer(folder, dtype=jnp.bfloat16)
    assert module.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.float32
    tk, jk = _inputs("dev")
    ref = _reference(model, tk)
    out = np.asarray(jax.jit(lambda p, kw: module.apply({"params": p}, **kw))(params, jk))
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_guidance_must_match_config(models):
    _, _, (module, params) = models["schnell"]
    _, jk = _inputs("schnell")
    with pytest.raises(ValueError, match="guidance must be given exactly when guidance_embeds"):
        module.apply({"params": params}, **{**jk, "guidance": np.ones(B, np.float32)})


def test_pack_unpack_ids_match_pipeline():
    """NHWC helpers vs FluxPipeline's static NCHW methods (channel order of the packed features)."""
    latents = np.random.RandomState(2).randn(B, H, W, C).astype(np.float32)
    nchw = torch.tensor(latents.transpose(0, 3, 1, 2))
    want = FluxPipeline._pack_latents(nchw, B, C, H, W).numpy()
    packed = np.asarray(pack_latents(jnp.asarray(latents)))
    np.testing.assert_array_equal(packed, want)
    vae_scale = 8
    back = FluxPipeline._unpack_latents(torch.tensor(want), H * vae_scale, W * vae_scale, vae_scale)
    np.testing.assert_array_equal(
        np.asarray(unpack_latents(packed, H, W)), back.numpy().transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, H, W)), latents)
    ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(H // 2, W // 2), ids)


def test_export_round_trip(models):
    """flux_to_torch loads into diffusers with strict=True and reproduces the saved weights."""
    _, model, (_, params) = models["dev"]
    state = flux_to_torch(params)
    fresh = diffusers.FluxTransformer2DModel(**CONFIGS["dev"])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


# ---- errors -----------------------------------------------------------------------------------
def _copy(folder: str, dst: str, edit_config=None, edit_state=None) -> str:
    os.makedirs(dst)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(state)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return dst


def test_errors_name_the_option_or_key(models, tmp_path):
    folder = models["dev"][0]
    for i, (edit, match) in enumerate(
        [
            ({"use_rope": True}, "unknown option 'use_rope'"),
            ({"axes_dims_rope": [2, 2, 2]}, "axes_dims_rope \\(2, 2, 2\\) must sum to attention_head_dim"),
        ]
    ):
        bad = _copy(folder, str(tmp_path / f"c{i}"), edit_config=lambda c, e=edit: c.update(e))
        with pytest.raises(UserError, match=match) as err:
            load_flux_transformer(bad)
        assert "config.json" in str(err.value)
    bad = str(tmp_path / "d")
    os.makedirs(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(CONFIGS["dev"], f)
    with pytest.raises(UserError, match="no safetensors weights"):
        load_flux_transformer(bad)
    with pytest.raises(UserError, match="not found"):
        load_flux_transformer(str(tmp_path / "nowhere"))
    key = "time_text_embed.guidance_embedder.linear_1.weight"
    bad = _copy(folder, str(tmp_path / "e"), edit_state=lambda s: s.pop(key))
    with pytest.raises(UserError, match=f"missing keys \\['{key}'\\]"):
        load_flux_transformer(bad)
    bad = _copy(folder, str(tmp_path / "f"), edit_state=lambda s: s.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(UserError, match="unexpected keys \\['extra'\\]"):
        load_flux_transformer(bad)
    key = "single_transformer_blocks.1.attn.norm_k.weight"
    bad = _copy(folder, str(tmp_path / "g"), edit_state=lambda s: s.update({key: np.ones(4, np.float32)}))
    with pytest.raises(UserError, match=f"shape mismatch at '{key}'"):
        load_flux_transformer(bad)
