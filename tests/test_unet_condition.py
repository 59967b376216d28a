"""UNet2DCondition vs diffusers' UNet2DConditionModel on tiny random configs (SD 1.5 / 2.1 / SDXL-like)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.unet_condition import load_unet_condition  # noqa: E402

B, L, D = 2, 5, 32
TINY = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": D,
    "norm_num_groups": 8,
    "sample_size": 8,
}
CONFIGS = {
    # SD 1.5: conv projections, attention_head_dim = heads for every block
    "sd15": {
        **TINY,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
    },
    # SD 2.1: linear projections, upcast attention, per-block heads; plus a class table
    "sd21": {
        **TINY,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "upcast_attention": True,
        "num_class_embeds": 3,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
    },
    # SDXL: text_time added embedding, 2 transformer layers in the lower block
    "sdxl": {
        **TINY,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "transformer_layers_per_block": (1, 2),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 16 + 6 * 8,
    },
    # LCM/TCD-distilled: guidance embedding into time_embedding.cond_proj; projection class embedding
    "lcm": {
        **TINY,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 4,
        "time_cond_proj_dim": 16,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 12,
        "time_embedding_act_fn": "silu",
    },
}


def _inputs(name: str) -> tuple[dict, dict]:
    """(torch kwargs, JAX kwargs) of the same random inputs for config `name`."""
    rng = np.random.RandomState(0)
    x = rng.randn(B, 4, 8, 8).astype(np.float32)
    ctx = rng.randn(B, L, D).astype(np.float32)
    t = np.array([10.0, 731.0], np.float32)
    tk = {"sample": torch.tensor(x), "timestep": torch.tensor(t), "encoder_hidden_states": torch.tensor(ctx)}
    jk = {"sample": x.transpose(0, 2, 3, 1), "timestep": t, "encoder_hidden_states": ctx}
    if name == "sd21":
        labels = np.array([2, 0])
        tk["class_labels"], jk["class_labels"] = torch.tensor(labels), labels
    if name == "sdxl":
        text = rng.randn(B, 16).astype(np.float32)
        ids = np.array([[64, 64, 0, 0, 64, 64], [32, 48, 8, 4, 64, 64]], np.float32)
        tk["added_cond_kwargs"] = {"text_embeds": torch.tensor(text), "time_ids": torch.tensor(ids)}
        jk["added_cond"] = {"text_embeds": text, "time_ids": ids}
    if name == "lcm":
        cond = rng.randn(B, 16).astype(np.float32)
        labels = rng.randn(B, 12).astype(np.float32)
        tk["timestep_cond"], jk["timestep_cond"] = torch.tensor(cond), cond
        tk["class_labels"], jk["class_labels"] = torch.tensor(labels), labels
    return tk, jk


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (saved unet folder, diffusers reference output NHWC)}."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = diffusers.UNet2DConditionModel(**cfg).eval()
        with torch.no_grad():  # make the zero-initialised branches (cond_proj, ...) count
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        tk, _ = _inputs(name)
        with torch.no_grad():
            ref = model(**tk).sample.numpy().transpose(0, 2, 3, 1)
        out[name] = (folder, ref)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(folders, name):
    folder, ref = folders[name]
    module, params = load_unet_condition(folder)
    _, jk = _inputs(name)
    out = np.asarray(jax.jit(lambda p, kw: module.apply({"params": p}, **kw))(params, jk))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()


def test_bf16_and_remat(folders):
    """bf16 compute (params stay float32) within 5% of the output scale; remat changes nothing."""
    folder, ref = folders["sdxl"]
    module, params = load_unet_condition(folder, dtype=jnp.bfloat16, remat=True)
    assert module.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.float32
    _, jk = _inputs("sdxl")

    def loss(p):
        return jnp.mean(module.apply({"params": p}, **jk) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    out = np.asarray(jax.jit(lambda p: module.apply({"params": p}, **jk))(params))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), np.abs(out - ref).max()
    assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


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


def test_errors_name_the_option_or_key(folders, tmp_path):
    folder, _ = folders["sd15"]
    bad = _copy(folder, str(tmp_path / "a"), edit_config=lambda c: c.update(use_flash_attn=True))
    with pytest.raises(UserError, match="unknown option 'use_flash_attn'"):
        load_unet_condition(bad)
    bad = _copy(
        folder, str(tmp_path / "b"), edit_config=lambda c: c.update(resnet_time_scale_shift="scale_shift")
    )
    with pytest.raises(UserError, match="resnet_time_scale_shift='scale_shift' is not supported"):
        load_unet_condition(bad)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    bad = _copy(folder, str(tmp_path / "c"), edit_state=lambda s: s.pop(key))
    with pytest.raises(ValueError, match=f"missing keys \\['{key}'\\]"):
        load_unet_condition(bad)
    bad = _copy(
        folder, str(tmp_path / "d"), edit_state=lambda s: s.update({key: np.zeros((32, 16), np.float32)})
    )
    with pytest.raises(ValueError, match=f"shape mismatch at '{key}'"):
        load_unet_condition(bad)
