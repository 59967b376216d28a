"""AutoencoderKL twin (models/vae.py) against diffusers' AutoencoderKL on tiny random configs.

Each config is built in torch with perturbed weights (so norm scales/biases matter), saved with
save_pretrained(safe_serialization=True) and read back by `load_vae`: encoder moments, decode,
scaled latents and the tiled paths are compared with the PyTorch reference.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models import vae as vae_lib  # noqa: E402

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)
# SD3 / Flux-like: 16 latent channels, shift_factor, no quant convs; plus 2 resnets per block and
# no mid-block attention so those branches are covered too.
SD3_LIKE = dict(
    TINY,
    latent_channels=16,
    layers_per_block=2,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)
FP32_TOL = 1e-4
BF16_TOL = 5e-2  # max abs error of bf16 compute vs fp32 torch, outputs of scale ~1


def _torch_vae(config: dict, seed: int) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():  # GroupNorm starts at 1 / 0: perturb so its mapping is tested
            p.add_(0.1 * torch.randn_like(p))
    return vae


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    """name -> the torch reference, its saved folder, our loaded twin, an image batch, diffusers'
    posterior of it and our (mean, logvar) of it (one jit per config)."""
    out = {}
    for name, config in (("tiny", TINY), ("sd3_like", SD3_LIKE)):
        ref = _torch_vae(config, seed=len(name))
        folder = str(tmp_path_factory.mktemp(name) / "vae")
        ref.save_pretrained(folder, safe_serialization=True)
        vae, params = vae_lib.load_vae(folder)
        x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
        with torch.no_grad():
            posterior = ref.encode(_nchw(x)).latent_dist
        encode = jax.jit(lambda p, x, vae=vae: vae_lib.encode(vae, p, x))
        out[name] = dict(
            name=name,
            ref=ref,
            folder=folder,
            vae=vae,
            params=params,
            x=x,
            posterior=posterior,
            encode=encode,
            moments=encode(params, x),
        )
    return out


@pytest.fixture(params=["tiny", "sd3_like"])
def case(request, cases) -> dict:
    return cases[request.param]


@pytest.fixture
def tiny(cases) -> dict:
    return cases["tiny"]


def test_encode_moments_match_diffusers(case):
    vae, post = case["vae"], case["posterior"]
    mean, logvar = case["moments"]
    assert mean.shape == vae_lib.latent_shape(vae, case["x"].shape) == (2, 8, 8, vae.latent_channels)
    assert _err(mean, _nhwc(post.mean)) < FP32_TOL
    assert _err(logvar, _nhwc(post.logvar)) < FP32_TOL


def test_decode_matches_diffusers(case):
    vae, params = case["vae"], case["params"]
    z = np.random.default_rng(1).normal(size=(2, 8, 8, vae.latent_channels)).astype(np.float32)
    out = jax.jit(lambda p, z: vae_lib.decode(vae, p, z))(params, z)
    with torch.no_grad():
        want = _nhwc(case["ref"].decode(_nchw(z)).sample)
    assert out.shape == (2, 16, 16, 3)
    assert _err(out, want) < FP32_TOL


def test_scaled_latents_and_sampling(case):
    """The pipelines' latents: SD (z * scaling) and SD3/Flux ((z - shift) * scaling), from the
    posterior's mode and from a sample mean + std * eps with diffusers' std."""
    vae, post, cfg = case["vae"], case["posterior"], case["ref"].config
    mean, logvar = case["moments"]
    shift = cfg.shift_factor or 0.0
    mode = vae_lib.latents_from_moments(mean, logvar, None)
    assert _err(vae_lib.to_latents(vae, mode), _nhwc((post.mode() - shift) * cfg.scaling_factor)) < FP32_TOL
    rng = jax.random.PRNGKey(3)
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    sample = vae_lib.latents_from_moments(mean, logvar, rng)
    assert _err(sample, _nhwc(post.mean) + _nhwc(post.std) * eps) < FP32_TOL
    assert _err(vae_lib.from_latents(vae, vae_lib.to_latents(vae, sample)), sample) < 1e-5
    assert (vae.shift_factor is None) == (case["name"] == "tiny")


def test_logvar_is_clamped_as_diffusers_does(tiny):
    """A quant_conv bias pushing half the log-variances past 20 and half below -30: both clamped."""
    bias = np.zeros(8, np.float32)
    bias[4:6], bias[6:] = 80.0, -80.0
    params = jax.tree_util.tree_map(lambda a: a, tiny["params"])
    params["params"]["quant_conv"]["bias"] = params["params"]["quant_conv"]["bias"] + bias
    ref = _torch_vae(TINY, seed=0)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in vae_lib.to_diffusers_state_dict(params).items()})
    with torch.no_grad():
        post = ref.encode(_nchw(tiny["x"])).latent_dist
    mean, logvar = tiny["encode"](params, tiny["x"])
    assert float(logvar.max()) == 20.0 and float(logvar.min()) == -30.0
    assert _err(logvar, _nhwc(post.logvar)) < FP32_TOL and _err(mean, _nhwc(post.mean)) < FP32_TOL


def test_tiled_encode_decode_match_diffusers_enable_tiling(tiny):
    """Tiles of 16 px / 8 latents on a 24x20 image and a 12x10 latent: two rows by two columns
    of overlapping tiles, the edge ones smaller, blended over 2 latents / 4 px, then cropped."""
    vae, params, ref = tiny["vae"], tiny["params"], tiny["ref"]
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 16, 8
    tiling = vae_lib.default_tiling(vae, sample_min_size=16)
    assert tiling == vae_lib.Tiling(16, 8, 0.25)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 24, 20, 3)).astype(np.float32)
    z = rng.normal(size=(1, 12, 10, vae.latent_channels)).astype(np.float32)
    try:
        with torch.no_grad():
            post = ref.encode(_nchw(x)).latent_dist
            dec = _nhwc(ref.decode(_nchw(z)).sample)
    finally:
        ref.disable_tiling()
    tiled = jax.jit(lambda p, x, z: (vae_lib.encode(vae, p, x, tiling), vae_lib.decode(vae, p, z, tiling)))
    (mean, logvar), out = tiled(params, x, z)
    assert mean.shape == (1, 12, 10, 4) and out.shape == (1, 24, 20, 3)
    assert _err(mean, _nhwc(post.mean)) < FP32_TOL
    assert _err(logvar, _nhwc(post.logvar)) < FP32_TOL
    assert _err(out, dec) < FP32_TOL
    # the tiles really were blended (tiling changes the result), else the test would pin nothing
    with torch.no_grad():
        untiled = _nhwc(ref.decode(_nchw(z)).sample)
    assert _err(dec, untiled) > 1e-3


def test_bf16_compute_within_tolerance(tiny):
    vae, params = vae_lib.load_vae(tiny["folder"], dtype="bfloat16")
    assert vae.dtype == "bfloat16"
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
    z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    (mean, _), out = jax.jit(lambda p, x, z: (vae_lib.encode(vae, p, x), vae_lib.decode(vae, p, z)))(
        params, tiny["x"], z
    )
    assert mean.dtype == out.dtype == jnp.float32
    with torch.no_grad():
        want = _nhwc(tiny["ref"].decode(_nchw(z)).sample)
    assert _err(mean, _nhwc(tiny["posterior"].mean)) < BF16_TOL
    assert _err(out, want) < BF16_TOL


def test_latent_shape_of_odd_images_matches_diffusers():
    config = dict(
        TINY,
        block_out_channels=(4, 4, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    ref = _torch_vae(config, seed=0)
    vae = vae_lib.vae_from_config(ref.config)
    for hgt, wid in ((16, 16), (15, 13), (18, 10)):
        with torch.no_grad():
            want = ref.encode(torch.zeros(1, 3, hgt, wid)).latent_dist.mean.shape
        assert vae_lib.latent_shape(vae, (1, hgt, wid, 3)) == (1, want[2], want[3], want[1])
    assert vae_lib.downsample_factor(vae) == 4


def _copy_folder(case, tmp_path, edit_config=None, edit_state=None) -> str:
    folder = str(tmp_path / "vae")
    os.makedirs(folder)
    with open(os.path.join(case["folder"], "config.json")) as f:
        config = json.load(f)
    if edit_config:
        edit_config(config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    state = safetensors_torch.load_file(os.path.join(case["folder"], "diffusion_pytorch_model.safetensors"))
    if edit_state:
        edit_state(state)
    safetensors_torch.save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return folder


def _one_line_error(folder: str) -> str:
    with pytest.raises(UserError) as err:
        vae_lib.load_vae(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_config_and_weights_errors_name_the_culprit(tiny, tmp_path):
    message = _one_line_error(_copy_folder(tiny, tmp_path / "a", edit_config=lambda c: c.update(foo_bar=1)))
    assert "unknown option 'foo_bar'" in message and "config.json" in message
    message = _one_line_error(
        _copy_folder(tiny, tmp_path / "b", edit_config=lambda c: c.update(act_fn="gelu"))
    )
    assert "act_fn='gelu' is not supported" in message
    bad_block = lambda c: c.update(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
    assert "AttnDownEncoderBlock2D" in _one_line_error(
        _copy_folder(tiny, tmp_path / "c", edit_config=bad_block)
    )
    key = "encoder.mid_block.attentions.0.to_q.weight"
    message = _one_line_error(_copy_folder(tiny, tmp_path / "d", edit_state=lambda s: s.pop(key)))
    assert f"missing keys ['{key}']" in message and "unexpected keys []" in message
    message = _one_line_error(
        _copy_folder(tiny, tmp_path / "e", edit_state=lambda s: s.update(extra_thing=torch.zeros(1)))
    )
    assert "unexpected keys ['extra_thing']" in message
    shape_key = "decoder.up_blocks.0.upsamplers.0.conv.weight"
    message = _one_line_error(
        _copy_folder(
            tiny, tmp_path / "f", edit_state=lambda s: s.update({shape_key: torch.zeros(16, 16, 1, 1)})
        )
    )
    assert f"shape mismatch at '{shape_key}'" in message


def test_param_keys_are_the_diffusers_keys(case):
    ours = vae_lib.to_diffusers_state_dict(case["params"])
    theirs = case["ref"].state_dict()
    assert set(ours) == set(theirs)
    for key in ("encoder.down_blocks.0.resnets.0.norm1.weight", "decoder.conv_out.bias"):
        np.testing.assert_array_equal(ours[key], theirs[key].numpy())
    assert ("quant_conv.weight" in ours) == (case["name"] == "tiny")
