"""Networks: shapes, conditioning branches, student-from-teacher init, diffusers layout/parity."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from fewstep_jax.models import (
    build_model,
    diffusers_config,
    diffusers_key,
    guidance_scale_embedding,
    init_student_from_teacher,
    mlp_config,
    timestep_embedding,
    to_diffusers_state_dict,
    unet_config,
)

B = 3
T = jnp.array([0.05, 0.5, 0.93])
LABEL = jnp.array([2, -1, 0])


def tiny_unet_config(**overrides) -> ml_collections.ConfigDict:
    """A very small 8x8 UNet with attention in a down block, an up block and the mid block."""
    cfg = unet_config("digits")
    cfg.block_out_channels = (8, 16)
    cfg.norm_num_groups = 4
    cfg.attention_head_dim = 8
    cfg.guidance_embed_dim = 16
    cfg.update(overrides)
    return cfg


def tiny_mlp_config(**overrides) -> ml_collections.ConfigDict:
    cfg = mlp_config()
    cfg.update(width=32, num_layers=2, emb_dim=16, guidance_embed_dim=16)
    cfg.update(overrides)
    return cfg


def init(cfg, x, **cond):
    """Real initialisation (jitted; the cheap-to-compile rbg key keeps the tests fast)."""
    model = build_model(cfg)
    key = jax.random.key(0, impl="unsafe_rbg")
    return model, jax.jit(model.init)(key, x, T, **cond)["params"]


def random_params(cfg, x, seed=0, **cond):
    """Params of the right shapes filled with non-trivial random values (no init compile)."""
    model = build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, T, **cond)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(noise * 0.3 + (1.0 if name == "scale" else 0.0))

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


X_MLP = jax.random.normal(jax.random.PRNGKey(2), (B, 2))
X_IMG = jax.random.normal(jax.random.PRNGKey(3), (B, 8, 8, 1))
FULL = dict(num_classes=3, use_s=True, use_guidance=True, num_step_classes=4)
FULL_INPUTS = dict(
    s=T * 0.5, label=LABEL, guidance=jnp.array([1.0, 4.0, 7.5]), num_steps=jnp.array([0, 1, 3])
)


def jit_apply(model, **static):
    return jax.jit(lambda p, x, t, **kw: model.apply({"params": p}, x, t, **kw, **static))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_output_shapes_with_all_conditioning(kind):
    cfg = tiny_mlp_config(**FULL) if kind == "mlp" else tiny_unet_config(**FULL)
    x = X_MLP if kind == "mlp" else X_IMG
    model, params = random_params(cfg, x, **FULL_INPUTS)
    apply = jit_apply(model)
    out = apply(params, x, T, **FULL_INPUTS)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Scalar t / s / guidance / num_steps broadcast to (B,).
    scalar = dict(s=0.25, label=LABEL, guidance=3.0, num_steps=2)
    vector = dict(
        s=jnp.full((B,), 0.25), label=LABEL, guidance=jnp.full((B,), 3.0), num_steps=jnp.full((B,), 2)
    )
    np.testing.assert_allclose(
        apply(params, x, 0.5, **scalar), apply(params, x, jnp.full((B,), 0.5), **vector), rtol=1e-6
    )
    flat = traverse_util.flatten_dict(params)
    for branch in ("s_embedding", "class_embedding", "num_steps_embedding"):
        assert any(p[0] == branch for p in flat)
    assert ("time_embedding", "cond_proj", "kernel") in flat


def test_mnist_preset_shapes_and_size():
    model = build_model(unet_config("mnist"))
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((2,)))
    n = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    assert 1_000_000 <= n <= 2_000_000
    assert jax.eval_shape(model.apply, variables, x, jnp.zeros((2,))).shape == (2, 28, 28, 1)


def test_label_minus_one_is_null_row():
    cfg = tiny_mlp_config(num_classes=3)
    model, params = random_params(cfg, X_MLP, label=LABEL)
    assert params["class_embedding"]["embedding"].shape == (4, cfg.emb_dim)
    apply = jit_apply(model)
    null = apply(params, X_MLP, T, label=jnp.full((B,), -1))
    np.testing.assert_array_equal(null, apply(params, X_MLP, T, label=jnp.full((B,), 3)))
    np.testing.assert_array_equal(null, apply(params, X_MLP, T))  # no label -> null class
    assert not np.allclose(null, apply(params, X_MLP, T, label=jnp.zeros((B,), jnp.int32)))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_student_initialised_from_teacher_matches_exactly(kind):
    make = tiny_mlp_config if kind == "mlp" else tiny_unet_config
    x = X_MLP if kind == "mlp" else X_IMG
    teacher, t_params = random_params(make(num_classes=3), x, label=LABEL)
    student, s_params = init(make(**FULL), x, **FULL_INPUTS)
    s_params = init_student_from_teacher(s_params, t_params)
    ref = jit_apply(teacher)(t_params, x, T, label=LABEL)
    apply = jit_apply(student)
    for s, w, k in [(T, 1.0, 0), (jnp.zeros(B), 8.0, 3), (jnp.array([0.0, 0.3, 0.9]), 3.0, 2)]:
        out = apply(s_params, x, T, s=s, label=LABEL, guidance=w, num_steps=k)
        np.testing.assert_array_equal(out, ref)
    # The s-branch is wired: once trained (here: set to random values), s matters.
    _, trained = random_params(make(**FULL), x, seed=1, **FULL_INPUTS)
    s_params["s_embedding"] = trained["s_embedding"]
    a = apply(s_params, x, T, s=T, label=LABEL, guidance=1.0, num_steps=0)
    b = apply(s_params, x, T, s=jnp.zeros(B), label=LABEL, guidance=1.0, num_steps=0)
    assert not np.allclose(a, b)


def test_init_student_from_teacher_errors_name_the_key():
    teacher = {"params": {"a": {"kernel": jnp.zeros((2, 3))}}}
    student = {"params": {"a": {"kernel": jnp.zeros((2, 4))}, "extra": {"bias": jnp.ones(2)}}}
    with pytest.raises(ValueError, match="params/a/kernel"):
        init_student_from_teacher(student, teacher)
    with pytest.raises(ValueError, match="params/missing/bias"):
        init_student_from_teacher(student, {"params": {"missing": {"bias": jnp.zeros(2)}}})
    merged = init_student_from_teacher(student, {"params": {"a": {"kernel": jnp.ones((2, 4))}}})
    np.testing.assert_array_equal(merged["params"]["a"]["kernel"], np.ones((2, 4)))
    np.testing.assert_array_equal(merged["params"]["extra"]["bias"], np.ones(2))


def test_flax_to_diffusers_name_rule():
    assert (
        diffusers_key(("down_blocks_0", "resnets_0", "conv1", "kernel"))
        == "down_blocks.0.resnets.0.conv1.weight"
    )
    assert (
        diffusers_key(("mid_block", "attentions_0", "to_out_0", "bias"))
        == "mid_block.attentions.0.to_out.0.bias"
    )
    assert diffusers_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert diffusers_key(("conv_norm_out", "scale")) == "conv_norm_out.weight"
    assert diffusers_key(("class_embedding", "embedding")) == "class_embedding.weight"


@pytest.fixture(scope="module")
def torch_twin():
    """Our tiny conditional UNet (random params) and diffusers' UNet2DModel of the same config."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny_unet_config(num_classes=3, layers_per_block=2)
    model, params = random_params(cfg, X_IMG, label=LABEL)
    ref = diffusers.UNet2DModel(**diffusers_config(cfg)).eval()
    return torch, model, params, ref


def test_param_keys_and_shapes_match_diffusers(torch_twin):
    _, _, params, ref = torch_twin
    flat = traverse_util.flatten_dict(params)
    for path in [
        ("conv_in", "kernel"),
        ("time_embedding", "linear_2", "kernel"),
        ("down_blocks_0", "resnets_1", "norm2", "scale"),
        ("down_blocks_0", "downsamplers_0", "conv", "kernel"),
        ("down_blocks_1", "attentions_0", "to_q", "kernel"),
        ("up_blocks_0", "resnets_2", "conv_shortcut", "kernel"),
        ("up_blocks_0", "upsamplers_0", "conv", "kernel"),
        ("mid_block", "attentions_0", "group_norm", "bias"),
        ("conv_out", "bias"),
    ]:
        assert path in flat, path
    ours = to_diffusers_state_dict(params)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_mnist_preset_keys_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cfg = unet_config("mnist")
    shapes = jax.eval_shape(
        build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,))
    )["params"]
    ours = to_diffusers_state_dict(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes))
    theirs = diffusers.UNet2DModel(**diffusers_config(cfg)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_numerical_parity_with_diffusers(torch_twin):
    torch, model, params, ref = torch_twin
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in to_diffusers_state_dict(params).items()})
    out = np.asarray(jit_apply(model)(params, X_IMG, T, label=LABEL))
    with torch.no_grad():
        ref_out = (
            ref(
                torch.from_numpy(np.array(X_IMG)).permute(0, 3, 1, 2),
                torch.from_numpy(np.array(T)) * 1000.0,  # time_scale
                class_labels=torch.tensor([2, 3, 0]),  # label -1 -> null row 3
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    assert np.abs(out).max() > 0.1
    assert np.abs(out - ref_out).max() < 1e-4


def test_timestep_embedding_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import get_timestep_embedding

    ts = np.array([0.0, 1.5, 250.0, 999.0], np.float32)
    ref = get_timestep_embedding(
        torch.from_numpy(ts), 32, flip_sin_to_cos=True, downscale_freq_shift=0
    ).numpy()
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(ts), 32), ref, atol=1e-5)


def test_guidance_embedding_is_lcm_formula():
    emb = np.asarray(guidance_scale_embedding(jnp.array([0.0, 0.7]), 16))
    np.testing.assert_array_equal(emb[0], np.r_[np.zeros(8), np.ones(8)])
    # LCM: frequencies 10000 ** (-k / (half - 1)) applied to w * 1000, [sin, cos].
    np.testing.assert_allclose(
        emb[1, [0, 7, 8, 15]],
        [np.sin(700.0), np.sin(0.07), np.cos(700.0), np.cos(0.07)],
        rtol=1e-4,
        atol=1e-4,
    )


def test_bf16_compute_keeps_fp32_params_and_output():
    model32, params = random_params(tiny_unet_config(), X_IMG)
    model16 = build_model(tiny_unet_config(dtype="bfloat16"))
    shapes = jax.eval_shape(model16.init, jax.random.PRNGKey(0), X_IMG, T)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(shapes))
    out32 = jit_apply(model32)(params, X_IMG, T)
    out16 = jit_apply(model16)(params, X_IMG, T)
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out16, out32)  # really computed in bf16
    np.testing.assert_allclose(out16, out32, atol=0.05 * float(np.abs(out32).max()))


def test_jit_matches_eager_and_dropout_only_in_train():
    model, params = random_params(tiny_mlp_config(dropout=0.5), X_MLP)
    eager = model.apply({"params": params}, X_MLP, T)
    np.testing.assert_allclose(jit_apply(model)(params, X_MLP, T), eager, rtol=1e-6, atol=1e-6)
    train = jit_apply(model, train=True)
    a = train(params, X_MLP, T, rngs={"dropout": jax.random.PRNGKey(0)})
    b = train(params, X_MLP, T, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b) and not np.allclose(a, eager)


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="sample_size=28"):
        build_model(
            tiny_unet_config(
                sample_size=28,
                block_out_channels=(8, 16, 16, 16),
                down_block_types=("DownBlock2D",) * 4,
                up_block_types=("UpBlock2D",) * 4,
            )
        )
    with pytest.raises(ValueError, match="widht"):
        build_model(tiny_mlp_config(widht=3))
    with pytest.raises(ValueError, match="name"):
        build_model(ml_collections.ConfigDict({"name": "transformer"}))
    with pytest.raises(ValueError, match="down_block_types"):
        build_model(tiny_unet_config(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")))
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_model(tiny_unet_config(norm_num_groups=3))
    model, params = random_params(tiny_mlp_config(), X_MLP)
    with pytest.raises(ValueError, match="num_classes=0"):
        model.apply({"params": params}, X_MLP, T, label=LABEL)
    with pytest.raises(ValueError, match="use_s=False"):
        model.apply({"params": params}, X_MLP, T, s=T)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(3,\)"):
        model.apply({"params": params}, X_MLP, jnp.zeros((2,)))
    unet = build_model(tiny_unet_config())
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 1)), 0.5)
