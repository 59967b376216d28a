"""PixArtTransformer2D and PatchEmbed vs diffusers' PixArtTransformer2DModel / PatchEmbed on tiny
random configs (PixArt-alpha-like with resolution / aspect-ratio conditions, Sigma-like without)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import PatchEmbed as TorchPatchEmbed  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.patch_embed import PatchEmbed, sincos_pos_embed_2d  # noqa: E402
from fewstep_jax.models.pixart import (  # noqa: E402
    load_pixart_transformer,
    param_shapes,
    pixart_from_config,
    pixart_to_torch,
)
from fewstep_jax.models.state_dict import params_from_torch  # noqa: E402

B, L, CAPTION = 2, 5, 16
TINY = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "in_channels": 4,
    "out_channels": 8,
    "sample_size": 8,
    "patch_size": 2,
    "caption_channels": CAPTION,
}
CONFIGS = {
    # PixArt-alpha 1024-like: resolution / aspect-ratio embeddings (width 24, divisible by 3)
    "alpha": {**TINY, "attention_head_dim": 12, "cross_attention_dim": 24, "use_additional_conditions": True},
    # PixArt-Sigma-like: no additional conditions, interpolation_scale 2; affine norms and upcast
    # attention to cover those params / paths
    "sigma": {
        **TINY,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
        "use_additional_conditions": False,
        "interpolation_scale": 2,
        "norm_elementwise_affine": True,
        "upcast_attention": True,
    },
}
# (H, W) of the latents: the config's sample size, and another (positional table recomputed)
SIZES = [(8, 8), (12, 8)]
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)


def _inputs(name: str, hw: tuple[int, int], mask: bool = True) -> tuple[dict, dict]:
    """(torch kwargs, JAX kwargs) of the same random inputs."""
    rng = np.random.RandomState(hw[0] * 100 + hw[1])
    x = rng.randn(B, 4, *hw).astype(np.float32)
    ctx = rng.randn(B, L, CAPTION).astype(np.float32)
    t = np.array([10.0, 731.0], np.float32)
    tk = {
        "hidden_states": torch.tensor(x),
        "encoder_hidden_states": torch.tensor(ctx),
        "timestep": torch.tensor(t),
    }
    jk = {"sample": x.transpose(0, 2, 3, 1), "timestep": t, "encoder_hidden_states": ctx}
    if mask:
        tk["encoder_attention_mask"], jk["encoder_attention_mask"] = torch.tensor(MASK), MASK
    if CONFIGS[name]["use_additional_conditions"]:
        res = np.array([[8.0 * hw[0], 8.0 * hw[1]], [1024.0, 768.0]], np.float32)
        ar = np.array([[hw[0] / hw[1]], [1024.0 / 768.0]], np.float32)
        tk["added_cond_kwargs"] = {"resolution": torch.tensor(res), "aspect_ratio": torch.tensor(ar)}
        jk["added_cond"] = {"resolution": res, "aspect_ratio": ar}
    return tk, jk


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (saved transformer folder, torch model, (module, params) loaded from the folder)}."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = diffusers.PixArtTransformer2DModel(**cfg).eval()
        with torch.no_grad():  # zero-free random weights everywhere
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, model, load_pixart_transformer(folder))
    return out


def _reference(model, tk) -> np.ndarray:
    with torch.no_grad():
        return model(**tk).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(models, name):
    """Masked text tokens at the config's sample size (alpha) and at another H/W (both); no mask
    (sigma)."""
    _, model, (module, params) = models[name]
    apply = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    cases = (
        [(SIZES[0], True), (SIZES[1], True)]
        if name == "alpha"
        else [(SIZES[1][::-1], True), (SIZES[0], False)]
    )
    for hw, mask in cases:
        tk, jk = _inputs(name, hw, mask)
        ref = _reference(model, tk)
        out = np.asarray(apply(params, jk))
        assert out.shape == (B, *hw, 8) and out.dtype == np.float32
        assert np.abs(out - ref).max() < 1e-5, (hw, mask, np.abs(out - ref).max())
    # the mask matters for the first sample (so the masked cases above test it)
    masked, unmasked = (_reference(model, _inputs(name, SIZES[0], m)[0]) for m in (True, False))
    assert np.abs(masked - unmasked)[0].max() > 1e-3


def test_remat_gradient_matches_torch(models):
    """Rematerialised blocks: d sum(out * w) / d params equals torch's autograd (via the export)."""
    _, model, (module, params) = models["sigma"]
    module = module.clone(remat=True)
    tk, jk = _inputs("sigma", SIZES[0])
    w = np.random.RandomState(3).randn(B, *SIZES[0], 8).astype(np.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, **jk) * w)))(params)
    model.zero_grad()
    (model(**tk).sample * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    ours = pixart_to_torch(grads)
    for key, p in model.named_parameters():
        want = p.grad.numpy()
        assert np.abs(ours[key] - want).max() < 1e-4 * max(1.0, np.abs(want).max()), key
    model.zero_grad(set_to_none=True)


def test_bf16(models):
    """bf16 compute (params stay float32) within 5% of the output scale."""
    folder, model, _ = models["alpha"]
    module, params = load_pixart_transformer(folder, dtype=jnp.bfloat16)
    assert module.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.float32
    tk, jk = _inputs("alpha", SIZES[0])
    ref = _reference(model, tk)
    out = np.asarray(jax.jit(lambda p: module.apply({"params": p}, **jk))(params))
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_additional_conditions_default_and_keys():
    """use_additional_conditions None -> on exactly at sample_size 128 (diffusers' rule), and the
    twin's params are diffusers' state dict, key for key and shape for shape."""
    for sample_size in (128, 64):
        cfg = {**CONFIGS["alpha"], "sample_size": sample_size, "num_layers": 1}
        del cfg["use_additional_conditions"]
        ref = diffusers.PixArtTransformer2DModel(**cfg)
        module = pixart_from_config(json.loads(json.dumps(dict(ref.config))))
        assert module.additional_conditions == ref.use_additional_conditions == (sample_size == 128)
        assert module.pos_interpolation_scale == ref.pos_embed.interpolation_scale
        torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        zeros = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(module).items()}
        ours = pixart_to_torch(traverse_util.unflatten_dict(zeros))
        assert {k: v.shape for k, v in ours.items()} == torch_shapes


def test_added_cond_errors(models):
    """Missing conditions where the config has them, given ones where it has not: errors (traced
    abstractly); None values (what PixArtSigmaPipeline passes) are accepted."""
    _, _, (module, params) = models["alpha"]
    _, jk = _inputs("alpha", SIZES[0])
    jk.pop("added_cond")
    with pytest.raises(ValueError, match="uses additional conditions"):
        jax.eval_shape(lambda p: module.apply({"params": p}, **jk), params)
    _, _, (module, params) = models["sigma"]
    _, jk = _inputs("sigma", SIZES[0])
    with pytest.raises(ValueError, match="no additional conditions"):
        jax.eval_shape(
            lambda p: module.apply({"params": p}, **jk, added_cond={"resolution": jk["timestep"]}), params
        )
    none = {"resolution": None, "aspect_ratio": None}
    jax.eval_shape(lambda p: module.apply({"params": p}, **jk, added_cond=none), params)


def test_export_round_trip(models):
    """pixart_to_torch loads into diffusers with strict=True and reproduces the saved weights."""
    _, model, (_, params) = models["sigma"]
    state = pixart_to_torch(params)
    fresh = diffusers.PixArtTransformer2DModel(**CONFIGS["sigma"])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


# ---- PatchEmbed -------------------------------------------------------------------------------
def _patch_parity(torch_kwargs: dict, sizes: list[tuple[int, int]], perturb_pos: bool = False) -> None:
    torch.manual_seed(0)
    ref = TorchPatchEmbed(**torch_kwargs).eval()
    state = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    if perturb_pos:  # the checkpoint's table is what SD3 adds, not a recomputed one
        state["pos_embed"] = state["pos_embed"] + 0.1 * np.random.RandomState(1).randn(
            *state["pos_embed"].shape
        ).astype(np.float32)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    module = PatchEmbed(
        height=torch_kwargs["height"],
        width=torch_kwargs["width"],
        patch_size=torch_kwargs["patch_size"],
        embed_dim=torch_kwargs["embed_dim"],
        layer_norm=torch_kwargs.get("layer_norm", False),
        interpolation_scale=torch_kwargs.get("interpolation_scale", 1),
        pos_embed_max_size=torch_kwargs.get("pos_embed_max_size"),
    )
    x0 = jnp.zeros((1, *sizes[0], torch_kwargs["in_channels"]))
    init = module.init(jax.random.PRNGKey(0), x0)["params"]
    if torch_kwargs.get("pos_embed_max_size") and not perturb_pos:
        # the param's initial value is diffusers' buffer
        np.testing.assert_allclose(np.asarray(init["pos_embed"]), state["pos_embed"], atol=1e-7)
    shapes = {p: v.shape for p, v in traverse_util.flatten_dict(init).items()}
    params = params_from_torch(state, shapes, ())
    rng = np.random.RandomState(0)
    for hw in sizes:
        x = rng.randn(2, torch_kwargs["in_channels"], *hw).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.tensor(x)).numpy()
        got = np.asarray(module.apply({"params": params}, x.transpose(0, 2, 3, 1)))
        assert got.shape == want.shape, (got.shape, want.shape)
        assert np.abs(got - want).max() < 1e-5, (hw, np.abs(got - want).max())


def test_patch_embed_pixart():
    """No table param; the sin-cos table recomputed for other sizes (non-square too)."""
    kw = {"height": 16, "width": 16, "patch_size": 2, "in_channels": 4, "embed_dim": 32}
    _patch_parity({**kw, "interpolation_scale": 2}, [(16, 16), (12, 20)])
    _patch_parity({**kw, "interpolation_scale": 1, "layer_norm": True}, [(16, 16), (8, 24)])


def test_patch_embed_sd3_cropping():
    """pos_embed_max_size: the centre crop of the checkpoint's table."""
    kw = {
        "height": 16,
        "width": 16,
        "patch_size": 2,
        "in_channels": 4,
        "embed_dim": 32,
        "pos_embed_max_size": 12,
    }
    _patch_parity(kw, [(16, 16), (10, 14), (24, 24)])
    _patch_parity(kw, [(16, 16), (14, 6)], perturb_pos=True)
    module = PatchEmbed(height=16, width=16, patch_size=2, embed_dim=32, pos_embed_max_size=12)
    with pytest.raises(ValueError, match="larger than pos_embed_max_size"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 26, 16, 4)))


def test_sincos_table():
    """diffusers' get_2d_sincos_pos_embed on a non-square grid, fractional scale."""
    for grid, base, scale in (((5, 7), 8, 3.0), ((16, 16), 16, 1.0), ((64, 48), 64, 2.0)):
        want = get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale).float().numpy()
        np.testing.assert_allclose(sincos_pos_embed_2d(32, grid, base, scale), want, rtol=0, atol=1e-7)


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
    folder = models["sigma"][0]
    bad = _copy(folder, str(tmp_path / "a"), edit_config=lambda c: c.update(use_rope=True))
    with pytest.raises(UserError, match="unknown option 'use_rope'"):
        load_pixart_transformer(bad)
    bad = _copy(folder, str(tmp_path / "b"), edit_config=lambda c: c.update(attention_type="gated"))
    with pytest.raises(UserError, match="attention_type='gated' is not supported"):
        load_pixart_transformer(bad)
    bad = _copy(folder, str(tmp_path / "c"), edit_config=lambda c: c.update(activation_fn="swiglu"))
    with pytest.raises(UserError, match="activation_fn 'swiglu'"):
        load_pixart_transformer(bad)
    bad = str(tmp_path / "d")
    os.makedirs(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(CONFIGS["sigma"], f)
    with pytest.raises(UserError, match="no safetensors weights"):
        load_pixart_transformer(bad)
    with pytest.raises(UserError, match="not found"):
        load_pixart_transformer(str(tmp_path / "nowhere"))
    key = "transformer_blocks.1.attn2.to_k.weight"
    bad = _copy(folder, str(tmp_path / "e"), edit_state=lambda s: s.pop(key))
    with pytest.raises(UserError, match=f"missing keys \\['{key}'\\]"):
        load_pixart_transformer(bad)
    bad = _copy(folder, str(tmp_path / "f"), edit_state=lambda s: s.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(UserError, match="unexpected keys \\['extra'\\]"):
        load_pixart_transformer(bad)
    bad = _copy(
        folder, str(tmp_path / "g"), edit_state=lambda s: s.update({key: np.zeros((16, 8), np.float32)})
    )
    with pytest.raises(UserError, match=f"shape mismatch at '{key}'"):
        load_pixart_transformer(bad)
