"""SD3Transformer2D and the MMDiT pieces vs diffusers' SD3Transformer2DModel / JointTransformerBlock on
tiny random configs (SD3-medium-like, SD3.5-like with RMS qk norm and a dual-attention block)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import JointTransformerBlock as TorchJointBlock  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.mmdit import MMDIT_LIST_NAMES, JointTransformerBlock  # noqa: E402
from fewstep_jax.models.sd3 import (  # noqa: E402
    load_sd3_transformer,
    param_shapes,
    sd3_from_config,
    sd3_to_torch,
)
from fewstep_jax.models.state_dict import params_from_torch  # noqa: E402

B, L, JOINT, POOLED = 2, 5, 16, 12
TINY = {
    "sample_size": 8,
    "patch_size": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": JOINT,
    "caption_projection_dim": 16,
    "pooled_projection_dim": POOLED,
    "pos_embed_max_size": 16,
}
CONFIGS = {
    "sd3": {**TINY, "in_channels": 4, "out_channels": 4, "num_layers": 2},
    # SD3.5-medium-like: RMS qk norm, attn2 in the first block, 16 latent channels
    "sd35": {
        **TINY,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "qk_norm": "rms_norm",
        "dual_attention_layers": (0,),
    },
}
# (H, W) of the latents: the config's sample size, and another (another crop of the table)
SIZES = [(8, 8), (12, 6)]


def _perturb(model) -> None:
    """Zero-free random weights everywhere (norm weights are ones, biases zeros at init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _inputs(name: str, hw: tuple[int, int]) -> tuple[dict, dict]:
    """(torch kwargs, JAX kwargs) of the same random inputs."""
    rng = np.random.RandomState(hw[0] * 100 + hw[1])
    c = CONFIGS[name]["in_channels"]
    x = rng.randn(B, c, *hw).astype(np.float32)
    ctx = rng.randn(B, L, JOINT).astype(np.float32)
    pooled = rng.randn(B, POOLED).astype(np.float32)
    t = np.array([12.5, 731.0], np.float32)
    tk = {
        "hidden_states": torch.tensor(x),
        "encoder_hidden_states": torch.tensor(ctx),
        "pooled_projections": torch.tensor(pooled),
        "timestep": torch.tensor(t),
    }
    jk = {
        "sample": x.transpose(0, 2, 3, 1),
        "timestep": t,
        "encoder_hidden_states": ctx,
        "pooled_projections": pooled,
    }
    return tk, jk


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (saved transformer folder, torch model, (module, params) loaded from the folder)}."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = diffusers.SD3Transformer2DModel(**cfg).eval()
        _perturb(model)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, model, load_sd3_transformer(folder))
    return out


def _reference(model, tk) -> np.ndarray:
    with torch.no_grad():
        return model(**tk).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(models, name):
    _, model, (module, params) = models[name]
    apply = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    for hw in SIZES:
        tk, jk = _inputs(name, hw)
        ref = _reference(model, tk)
        out = np.asarray(apply(params, jk))
        assert out.shape == (B, *hw, CONFIGS[name]["out_channels"]) and out.dtype == np.float32
        assert np.abs(out - ref).max() < 1e-5, (hw, np.abs(out - ref).max())


def test_remat_gradient_matches_torch(models):
    """Rematerialised blocks: d sum(out * w) / d params equals torch's autograd (via the export)."""
    _, model, (module, params) = models["sd3"]
    module = module.clone(remat=True)
    tk, jk = _inputs("sd3", SIZES[0])
    w = np.random.RandomState(3).randn(B, *SIZES[0], 4).astype(np.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, **jk) * w)))(params)
    model.zero_grad()
    (model(**tk).sample * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    ours = sd3_to_torch(grads)
    for key, p in model.named_parameters():
        want = p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        assert np.abs(ours[key] - want).max() < 1e-4 * max(1.0, np.abs(want).max()), key
    model.zero_grad(set_to_none=True)


def test_bf16(models):
    """bf16 compute (params stay float32) within 5% of the output scale."""
    folder, model, _ = models["sd35"]
    module, params = load_sd3_transformer(folder, dtype=jnp.bfloat16)
    assert module.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.float32
    tk, jk = _inputs("sd35", SIZES[0])
    ref = _reference(model, tk)
    out = np.asarray(jax.jit(lambda p: module.apply({"params": p}, **jk))(params))
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize(
    "pre_only,qk_norm,dual",
    [(False, "layer_norm", True), (True, None, True)],
)
def test_joint_block(pre_only, qk_norm, dual):
    """JointTransformerBlock alone (the piece a Flux twin reuses): qk_norm="layer_norm" (no SD3
    config has it), dual attention in a context_pre_only block; the model tests cover the rest."""
    torch.manual_seed(7)
    ref = TorchJointBlock(16, 2, 8, context_pre_only=pre_only, qk_norm=qk_norm, use_dual_attention=dual)
    ref = ref.eval()
    _perturb(ref)
    rng = np.random.RandomState(0)
    x, c, temb = rng.randn(B, 6, 16), rng.randn(B, 4, 16), rng.randn(B, 16)
    x, c, temb = (a.astype(np.float32) for a in (x, c, temb))
    with torch.no_grad():
        want_c, want_x = ref(torch.tensor(x), torch.tensor(c), torch.tensor(temb))
    module = JointTransformerBlock(2, 8, context_pre_only=pre_only, qk_norm=qk_norm, use_dual_attention=dual)
    init = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, c, temb))["params"]
    shapes = {p: v.shape for p, v in traverse_util.flatten_dict(init).items()}
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = params_from_torch(state, shapes, MMDIT_LIST_NAMES)
    got_x, got_c = jax.jit(module.apply)({"params": params}, x, c, temb)
    assert np.abs(np.asarray(got_x) - want_x.numpy()).max() < 1e-5
    if pre_only:
        assert got_c is None and want_c is None
    else:
        assert np.abs(np.asarray(got_c) - want_c.numpy()).max() < 1e-5


def test_no_pos_embed_max_size():
    """pos_embed_max_size None: diffusers' recomputed sin-cos table (no table param), other size."""
    cfg = {**CONFIGS["sd3"], "pos_embed_max_size": None, "num_layers": 1}
    torch.manual_seed(3)
    model = diffusers.SD3Transformer2DModel(**cfg).eval()
    _perturb(model)
    module = sd3_from_config(json.loads(json.dumps(dict(model.config))))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert "pos_embed.pos_embed" not in state
    params = params_from_torch(state, param_shapes(module), MMDIT_LIST_NAMES)
    tk, jk = _inputs("sd3", SIZES[1])
    out = np.asarray(jax.jit(lambda p, kw: module.apply({"params": p}, **kw))(params, jk))
    assert np.abs(out - _reference(model, tk)).max() < 1e-5


def test_export_round_trip(models):
    """sd3_to_torch loads into diffusers with strict=True and reproduces the saved weights."""
    _, model, (_, params) = models["sd35"]
    state = sd3_to_torch(params)
    fresh = diffusers.SD3Transformer2DModel(**CONFIGS["sd35"])
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
    folder = models["sd35"][0]
    for i, (edit, match) in enumerate(
        [
            ({"use_rope": True}, "unknown option 'use_rope'"),
            ({"qk_norm": "l2"}, "qk_norm 'l2' is not supported"),
            ({"caption_projection_dim": 24}, "caption_projection_dim 24 must equal"),
            ({"dual_attention_layers": [0, 5]}, "dual_attention_layers \\[5\\]"),
        ]
    ):
        bad = _copy(folder, str(tmp_path / f"c{i}"), edit_config=lambda c, e=edit: c.update(e))
        with pytest.raises(UserError, match=match) as err:
            load_sd3_transformer(bad)
        assert "config.json" in str(err.value)
    bad = str(tmp_path / "d")
    os.makedirs(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(CONFIGS["sd3"], f)
    with pytest.raises(UserError, match="no safetensors weights"):
        load_sd3_transformer(bad)
    with pytest.raises(UserError, match="not found"):
        load_sd3_transformer(str(tmp_path / "nowhere"))
    key = "transformer_blocks.0.attn2.norm_k.weight"
    bad = _copy(folder, str(tmp_path / "e"), edit_state=lambda s: s.pop(key))
    with pytest.raises(UserError, match=f"missing keys \\['{key}'\\]"):
        load_sd3_transformer(bad)
    bad = _copy(folder, str(tmp_path / "f"), edit_state=lambda s: s.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(UserError, match="unexpected keys \\['extra'\\]"):
        load_sd3_transformer(bad)
    key = "transformer_blocks.1.attn.add_k_proj.weight"
    bad = _copy(
        folder, str(tmp_path / "g"), edit_state=lambda s: s.update({key: np.zeros((16, 8), np.float32)})
    )
    with pytest.raises(UserError, match=f"shape mismatch at '{key}'"):
        load_sd3_transformer(bad)
