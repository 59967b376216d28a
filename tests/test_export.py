"""Export to PyTorch / import from diffusers: parity of networks and samplers, round trips, errors;
writing an export without torch; diffusers loading the folder without a warning."""

import contextlib
import inspect
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_main import blocker

from fewstep_jax.export import export_params, import_diffusers_unet
from fewstep_jax.models import build_model, mlp_config, unet_config
from fewstep_jax.paths import DDPM, RectifiedFlow
from fewstep_jax.students import Student, model_apply

try:  # the torch-free tests run without the extra too
    import diffusers
    import torch
    from safetensors.torch import load_file

    from fewstep_jax.export import torch_models, torch_sampler
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason='needs the torch extra: pip install "fewstep-jax[torch]"'
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

B = 3
T = np.array([0.05, 0.5, 0.93], np.float32)
LABEL = np.array([2, -1, 0], np.int32)
FULL = dict(num_classes=3, use_s=True, use_guidance=True, num_step_classes=4)
FULL_IN = dict(
    s=T * 0.5,
    label=LABEL,
    guidance=np.array([1.0, 4.0, 7.5], np.float32),
    num_steps=np.array([0, 1, 3], np.int32),
)
META = {"path": RectifiedFlow(), "prediction": "flow", "method": "test", "student_form": "euler"}


def tiny(kind, **over):
    if kind == "mlp":
        cfg = mlp_config()
        cfg.update(width=32, num_layers=2, emb_dim=16, guidance_embed_dim=16)
    else:
        cfg = unet_config("digits")
        cfg.update(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8, guidance_embed_dim=16)
    cfg.update(over)
    return cfg


def x_of(kind, seed=3):
    shape = (B, 2) if kind == "mlp" else (B, 8, 8, 1)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_params(cfg, x, seed=0):
    """Non-trivial random params of the right shapes (eval_shape: no init compile)."""
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), x, T)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(noise * 0.3 + (1.0 if path[-1].key == "scale" else 0.0))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def to_torch(x):
    x = torch.from_numpy(np.array(x))
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x


def from_torch(y):
    y = y.detach().float().numpy()
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


def jax_out(cfg, params, x, **cond):
    return np.asarray(build_model(cfg).apply({"params": params}, x, T, **cond))


def torch_out(model, x, **cond):
    with torch.no_grad():
        return from_torch(
            model(
                to_torch(x),
                torch.from_numpy(T),
                **{k: torch.from_numpy(np.asarray(v)) for k, v in cond.items()},
            )
        )


CASES = [
    ("mlp", {}, {}),
    ("mlp", FULL, FULL_IN),
    ("unet", {}, {}),
    ("unet", FULL, FULL_IN),
    ("unet", {"num_classes": 3}, {"label": LABEL}),
]


@pytest.mark.parametrize("kind,over,cond", CASES)
@needs_torch
def test_exported_network_matches_jax(tmp_path, kind, over, cond):
    cfg, x = tiny(kind, **over), x_of(kind)
    params = random_params(cfg, x)
    out = tmp_path / "exp"
    export_params(params, cfg, str(out), meta=dict(META, uses_s=bool(over.get("use_s"))))
    assert {"fewstep.json", "README.md", "torch_models.py", "torch_sampler.py"} <= set(os.listdir(out))
    model, _ = torch_models.load_exported(str(out))
    ref = jax_out(cfg, params, x, **cond)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(torch_out(model, x, **cond), ref, atol=1e-4, rtol=0)
    if over.get("use_s"):  # the s branch is wired in the mirror
        other = dict(cond, s=np.zeros(B, np.float32))
        assert np.abs(torch_out(model, x, **other) - torch_out(model, x, **cond)).max() > 1e-3
    # bf16 export: measured max error ~1e-2 relative; pinned at 5% of the output scale.
    export_params(params, cfg, str(out), meta=META, dtype="bfloat16", overwrite=True)
    model16, _ = torch_models.load_exported(str(out))
    assert model16.time_embedding.linear_1.weight.dtype == torch.bfloat16
    err = np.abs(torch_out(model16, x, **cond) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()


@needs_torch
def test_exported_folder_is_self_contained(tmp_path):
    cfg, x = tiny("mlp"), x_of("mlp")
    params = random_params(cfg, x)
    meta = dict(META, sampler={"grid": [1.0, 0.5, 0.0], "gamma": 0.0})
    export_params(params, cfg, str(tmp_path / "e"), meta=meta)
    folder = str(tmp_path / "e")
    code = (
        f"import sys, torch; sys.path.insert(0, {folder!r}); import torch_models, torch_sampler;"
        f"assert 'jax' not in sys.modules; m, c = torch_models.load_exported({folder!r});"
        "print(torch_sampler.sample_exported(m, c, torch.zeros(2, *c['input_shape'])).shape)"
    )
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "torch.Size([2, 2])" in res.stdout
    assert not os.path.exists(os.path.join(folder, "config.json"))  # not a diffusers folder
    with open(os.path.join(folder, "fewstep.json")) as f:
        written = json.load(f)
    assert written["path"] == {"name": "rf", "deriv_floor": 0.0}
    assert written["sampler"]["grid"] == [1.0, 0.5, 0.0] and written["method"] == "test"
    with open(os.path.join(folder, "README.md")) as f:
        assert "load_exported" in f.read()


@pytest.mark.parametrize(
    "form,path,pred,gamma", [("euler", RectifiedFlow(), "flow", 0.0), ("semilinear", DDPM(), "eps", 0.3)]
)
@needs_torch
def test_few_step_chain_matches_jax(tmp_path, form, path, pred, gamma):
    cfg, x1 = tiny("unet", use_s=True), x_of("unet", seed=5)
    params = random_params(cfg, x1, seed=1)
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    zs = np.random.default_rng(9).standard_normal((3, *x1.shape)).astype(np.float32)
    student = Student(model_apply(build_model(cfg)), path, form, pred, uses_s=True)

    step = jax.jit(student)  # one compile for every jump (t, s are traced (B,) arrays)

    def chain(p, x):  # the same chain as torch_sampler.sample, in JAX
        for i, (t, tn) in enumerate(itertools.pairwise(grid)):
            s = tn if i == len(grid) - 2 else (1 - gamma) * tn
            x = step(p, x, jnp.full((B,), t), jnp.full((B,), s))
            if i < len(grid) - 2 and gamma > 0:
                (a_s, g_s), (a_t, g_t) = path.alpha_sigma(jnp.float32(s)), path.alpha_sigma(jnp.float32(tn))
                x = (a_t / a_s) * x + jnp.sqrt(jnp.maximum(g_t**2 - (a_t / a_s * g_s) ** 2, 0)) * zs[i]
        return x

    ref = np.asarray(chain(params, x1))
    meta = {
        "path": path,
        "prediction": pred,
        "student_form": form,
        "uses_s": True,
        "sampler": {"grid": grid, "gamma": gamma},
    }
    export_params(params, cfg, str(tmp_path / "e"), meta=meta)
    model, fcfg = torch_models.load_exported(str(tmp_path / "e"))
    out = torch_sampler.sample_exported(model, fcfg, to_torch(x1), renoise_noise=[to_torch(z) for z in zs])
    assert np.abs(ref - x1).max() > 0.1
    np.testing.assert_allclose(from_torch(out), ref, atol=2e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def tiny_diffusers_unet(seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    kw.update(over)
    unet = diffusers.UNet2DModel(**kw).eval()
    with torch.no_grad():  # zero-initialised layers would hide mapping mistakes
        for p in unet.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return unet


@pytest.mark.parametrize("classes", [0, 4])
@needs_torch
def test_import_diffusers_unet_then_round_trip(tmp_path, classes):
    unet = tiny_diffusers_unet(num_class_embeds=classes or None)
    unet.save_pretrained(str(tmp_path / "unet"))
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    sched.save_config(str(tmp_path / "unet"))
    imp = import_diffusers_unet(str(tmp_path / "unet"))
    teacher = imp.teacher
    assert teacher.prediction == "v" and teacher.path == DDPM() and teacher.num_classes == max(classes - 1, 0)
    x = x_of("unet")
    k = np.array([3, 420, 999])
    t = np.asarray(teacher.path.timestep_to_t(k))
    label = np.array([2, -1, 0], np.int32) if classes else None
    with torch.no_grad():
        ref = unet(
            to_torch(x), torch.from_numpy(k), class_labels=torch.tensor([2, 3, 0]) if classes else None
        ).sample
    ours = np.asarray(teacher.predict(jnp.asarray(x), jnp.asarray(t), label))
    np.testing.assert_allclose(ours, from_torch(ref), atol=1e-4, rtol=0)

    # export back: the same tensors, bit for bit, and diffusers loads it
    out = str(tmp_path / "back")
    export_params(
        imp.params,
        imp.model_cfg,
        out,
        meta={"path": teacher.path, "prediction": "v", "time_offset": imp.time_offset},
    )
    a = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    again = diffusers.UNet2DModel.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(
            again(to_torch(x), 7, class_labels=torch.tensor([0, 1, 3]) if classes else None).sample.numpy(),
            unet(to_torch(x), 7, class_labels=torch.tensor([0, 1, 3]) if classes else None).sample.numpy(),
        )


@needs_torch
def test_t_only_unet_loads_in_diffusers_and_samples_with_its_schedulers(tmp_path):
    cfg, x = tiny("unet"), x_of("unet")
    params = random_params(cfg, x, seed=2)
    path = DDPM()
    export_params(
        params,
        cfg,
        str(tmp_path / "e"),
        meta={"path": path, "prediction": "eps", "student_form": "semilinear"},
    )
    with diffusers_warnings() as caught:
        unet = load_unet2d(str(tmp_path / "e"))
    assert caught == []  # config.json holds nothing UNet2DModel does not know
    with torch.no_grad():
        got = unet(to_torch(x), torch.from_numpy(T) * 1000.0).sample
    np.testing.assert_allclose(from_torch(got), jax_out(cfg, params, x), atol=1e-4, rtol=0)

    # DDIM (eta = 0), 4 steps in diffusers == our semilinear chain on t = (k + 1) / T, then t = 0.
    # Our network's time input is t * 1000 = k + 1, hence `timestep + 1`.
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    sched.set_timesteps(4)
    xt = to_torch(x)
    with torch.no_grad():
        for k in sched.timesteps:
            xt = sched.step(unet(xt, k + 1).sample, k, xt).prev_sample
    grid = [float(path.timestep_to_t(k)) for k in sched.timesteps.numpy()] + [0.0]
    model, fcfg = torch_models.load_exported(str(tmp_path / "e"))
    ours = torch_sampler.sample_exported(model, fcfg, to_torch(x), grid=grid)
    np.testing.assert_allclose(ours.numpy(), xt.numpy(), atol=1e-4 * max(1.0, float(xt.abs().max())), rtol=0)

    # TCD (gamma = 0.3): same chain with the same re-noising draws.
    tcd = diffusers.TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tcd.set_timesteps(4)
    ks = tcd.timesteps.numpy()
    zs = [
        torch.from_numpy(np.random.default_rng(i).standard_normal(xt.shape).astype(np.float32))
        for i in range(3)
    ]
    xt = to_torch(x)
    with torch.no_grad():
        for i, k in enumerate(tcd.timesteps):
            with _PatchedRandn(zs[min(i, 2)]):
                xt = tcd.step(unet(xt, k + 1).sample, k, xt, eta=0.3).prev_sample
    # TCD floors s' = (1 - gamma) k_next to an integer timestep and ends at k = 0 (t = 1 / T)
    ts = [float(path.timestep_to_t(k)) for k in ks]
    net = torch_sampler.network_fn(model, fcfg)
    tp = torch_sampler.Path(**fcfg["path"])
    y = to_torch(x)
    with torch.no_grad():
        for i in range(len(ks)):
            full = lambda v: torch.full((B,), v)
            last = i == len(ks) - 1
            s = float(path.timestep_to_t(0 if last else np.floor(0.7 * ks[i + 1])))
            y = torch_sampler.flow_map(net, tp, "semilinear", "eps", y, full(ts[i]), full(s))
            if not last:
                y = torch_sampler.renoise(tp, y, full(s), full(ts[i + 1]), zs[i])
    np.testing.assert_allclose(y.numpy(), xt.numpy(), atol=1e-4 * max(1.0, float(xt.abs().max())), rtol=0)


@contextlib.contextmanager
def diffusers_warnings():
    """The warnings (Python's and diffusers' logger's, WARNING and above) raised in the block."""
    caught: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("diffusers")  # does not propagate
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            yield caught
        caught.extend(str(w.message) for w in ws)
    finally:
        logger.removeHandler(handler)


def load_unet2d(folder):
    # low_cpu_mem_usage=False: without `accelerate` installed diffusers warns when it falls back to it
    return diffusers.UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()


class _PatchedRandn:
    """Make diffusers' randn_tensor return given noise (the re-noising draw of one TCD step)."""

    def __init__(self, z):
        self.z = z

    def __enter__(self):
        import diffusers.schedulers.scheduling_tcd as mod

        self.mod, self.orig = mod, mod.randn_tensor
        mod.randn_tensor = lambda shape, **kw: self.z.reshape(shape)

    def __exit__(self, *exc):
        self.mod.randn_tensor = self.orig


@needs_torch
def test_bad_inputs_raise_clear_errors(tmp_path):
    cfg, x = tiny("mlp"), x_of("mlp")
    params = random_params(cfg, x)
    export_params(params, cfg, str(tmp_path / "e"), meta=META)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_params(params, cfg, str(tmp_path / "e"), meta=META)
    flat = traverse_util.flatten_dict(params)
    flat[("blocks_0", "dense1", "kernel")] = jnp.zeros((32, 31))
    with pytest.raises(ValueError, match="blocks_0/dense1/kernel"):
        export_params(traverse_util.unflatten_dict(flat), cfg, str(tmp_path / "f"), meta=META)
    with pytest.raises(ValueError, match="prediction"):
        export_params(params, cfg, str(tmp_path / "g"), meta={"path": RectifiedFlow()})
    with pytest.raises(ValueError, match="unknown architecture 'transformer'"):
        torch_models.build_model("transformer", {}, (2,))
    # a state dict with a wrong shape / a missing key
    model = torch_models.build_model("mlp", cfg.to_dict(), (2,))
    state = dict(model.state_dict())
    state["blocks_1.dense2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=re.escape("blocks_1.dense2.weight")):
        torch_models.load_state_dict(model, state)
    del state["blocks_1.dense2.weight"]
    with pytest.raises(ValueError, match=re.escape("blocks_1.dense2.weight")):
        torch_models.load_state_dict(model, state)
    # import: missing file, missing key, unsupported architecture / field, pickles refused
    with pytest.raises(FileNotFoundError, match=re.escape("nope.safetensors")):
        import_diffusers_unet(str(tmp_path / "nope.safetensors"), config={})
    unet = tiny_diffusers_unet()
    unet.save_pretrained(str(tmp_path / "u"))
    w = str(tmp_path / "u" / "diffusion_pytorch_model.safetensors")
    st = load_file(w)
    del st["conv_out.bias"]
    from safetensors.torch import save_file

    save_file(st, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=re.escape("conv_out.bias")):
        import_diffusers_unet(str(tmp_path / "broken.safetensors"), config=str(tmp_path / "u/config.json"))
    dcfg = dict(unet.config)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        import_diffusers_unet(w, config=dict(dcfg, _class_name="UNet2DConditionModel"))
    with pytest.raises(ValueError, match="time_embedding_type"):
        import_diffusers_unet(w, config=dict(dcfg, time_embedding_type="fourier"))
    torch.save({"w": object()}, str(tmp_path / "pickled.bin"))
    with pytest.raises(ValueError, match="weights_only"):
        import_diffusers_unet(str(tmp_path / "pickled.bin"), config=dcfg)
    with pytest.raises(FileNotFoundError, match=re.escape("fewstep.json")):
        torch_models.load_exported(str(tmp_path))


def write_legacy_layout(folder):
    """Rewrites an exported folder as format_version 1 wrote it: no fewstep.json, the metadata in
    config.json's "fewstep" block (beside UNet2DModel's kwargs in the diffusers layout)."""
    meta_file, config_file = os.path.join(folder, "fewstep.json"), os.path.join(folder, "config.json")
    with open(meta_file) as f:
        meta = dict(json.load(f), format_version=1)
    config = {}
    if os.path.exists(config_file):
        with open(config_file) as f:
            config = json.load(f)
    with open(config_file, "w") as f:
        json.dump(dict(config, fewstep=meta), f)
    os.remove(meta_file)


@needs_torch
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_folders_of_the_previous_layout_still_load(tmp_path, kind):
    cfg, x = tiny(kind), x_of(kind)
    params = random_params(cfg, x, seed=4)
    folder = str(tmp_path / "old")
    export_params(params, cfg, folder, meta=META)
    write_legacy_layout(folder)
    model, meta = torch_models.load_exported(folder)
    assert meta["format_version"] == 1 and meta["architecture"] == kind
    np.testing.assert_allclose(torch_out(model, x), jax_out(cfg, params, x), atol=1e-4, rtol=0)
    if kind == "unet":  # what the layout change fixes, and the capture above can see it
        with diffusers_warnings() as caught:
            load_unet2d(folder)
        assert any("fewstep" in w for w in caught), caught


@needs_torch
def test_diffusers_config_has_only_unet2dmodel_keys(tmp_path):
    cfg, x = tiny("unet", num_classes=3), x_of("unet")
    export_params(random_params(cfg, x), cfg, str(tmp_path / "e"), meta=META)
    with open(tmp_path / "e" / "config.json") as f:
        config = json.load(f)
    known = set(inspect.signature(diffusers.UNet2DModel.__init__).parameters) - {"self"}
    assert set(config) - known == {"_class_name", "_diffusers_version"}
    assert config["_diffusers_version"] == diffusers.__version__ and config["num_class_embeds"] == 4


NO_TORCH_CASES = [
    ("mlp", "mlp", FULL, "float32"),
    ("unet", "unet", {}, "float32"),
    ("unet16", "unet", {}, "bfloat16"),
]


def torch_layout(params) -> dict[str, np.ndarray]:
    """{Flax path: array in torch layout}: Dense kernels (in, out) -> (out, in), conv HWIO -> OIHW."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.asarray(v, np.float32)
        out[path] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if path[-1] == "kernel" else v)
    return out


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (finite values)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def read_safetensors_raw(path) -> dict[str, tuple[str, np.ndarray]]:
    """{key: (dtype name, raw bytes as uint8)} from the safetensors format itself (8-byte header
    length, JSON header, data): safetensors.numpy cannot read bfloat16."""
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n :]
    return {
        k: (h["dtype"], np.frombuffer(data[slice(*h["data_offsets"])], np.uint8)) for k, h in header.items()
    }


def export_without_torch(root: str) -> dict:
    """Run by the test below in a process where torch and diffusers cannot be imported: exports,
    reads the weights back with safetensors.numpy (or raw, for bfloat16) and tries the self-check."""
    from safetensors.numpy import load_file as load_np

    from fewstep_jax.errors import UserError
    from fewstep_jax.export.check import check_export
    from fewstep_jax.models import diffusers_key

    report = {}
    for name, kind, over, dtype in NO_TORCH_CASES:
        cfg, x = tiny(kind, **over), x_of(kind)
        params = random_params(cfg, x)
        folder = os.path.join(root, name)
        export_params(params, cfg, folder, meta=META, dtype=dtype)
        with open(os.path.join(folder, "fewstep.json")) as f:
            meta = json.load(f)
        weights = os.path.join(folder, meta["weights"])
        want = {diffusers_key(p): v for p, v in torch_layout(params).items()}
        if dtype == "float32":
            got = load_np(weights)
            assert set(got) == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(got[k], v, err_msg=k)
        else:
            raw = read_safetensors_raw(weights)
            assert set(raw) == set(want)
            for k, v in want.items():
                assert raw[k][0] == "BF16"
                np.testing.assert_array_equal(raw[k][1].view(np.uint16).reshape(v.shape), bfloat16_bits(v), k)
        config = None
        if os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
        try:
            check_export(folder, params, cfg)
            hint = None
        except UserError as e:
            hint = str(e)
        report[name] = {"files": sorted(os.listdir(folder)), "meta": meta, "config": config, "hint": hint}
    report["imported"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "diffusers"})
    return report


def test_export_needs_no_torch(tmp_path):
    code = blocker(("torch", "diffusers")) + (
        "import json, sys; sys.path.insert(0, 'tests'); import test_export;"
        f"print(json.dumps(test_export.export_without_torch({str(tmp_path)!r})))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []
    for name, kind, over, dtype in NO_TORCH_CASES:
        got = report[name]
        diffusers_layout = kind == "unet" and not over
        weights = "diffusion_pytorch_model.safetensors" if diffusers_layout else "model.safetensors"
        assert got["files"] == sorted(
            ["README.md", "fewstep.json", weights, "torch_models.py", "torch_sampler.py"]
            + (["config.json"] if diffusers_layout else [])
        )
        meta = got["meta"]
        assert (meta["architecture"], meta["dtype"], meta["weights"]) == (kind, dtype, weights)
        assert meta["format_version"] == 2 and meta["prediction"] == "flow" and meta["method"] == "test"
        assert meta["data_shape"] == ([2] if kind == "mlp" else [8, 8, 1])
        if diffusers_layout:
            assert got["config"]["_class_name"] == "UNet2DModel" and "fewstep" not in got["config"]
            assert got["config"]["block_out_channels"] == [8, 16]
            if torch is not None:  # the installed diffusers knows every key
                known = set(inspect.signature(diffusers.UNet2DModel.__init__).parameters)
                assert set(got["config"]) - known == {"_class_name", "_diffusers_version"}
        # the self-check needs torch: one line naming the extra
        assert got["hint"].count("\n") == 0 and 'pip install "fewstep-jax[torch]"' in got["hint"], got["hint"]
        assert "self-check" in got["hint"] and "torch" in got["hint"]


@needs_torch
@pytest.mark.parametrize("kind,over", [("mlp", FULL), ("unet", {"num_classes": 3})])
def test_self_check_passes_on_an_export_and_fails_on_altered_weights(tmp_path, kind, over):
    from safetensors.torch import save_file

    from fewstep_jax.export.check import check_export

    cfg, x = tiny(kind, **over), x_of(kind)
    params = random_params(cfg, x, seed=6)
    folder = str(tmp_path / "e")
    export_params(params, cfg, folder, meta=META)
    assert check_export(folder, params, cfg) < 1e-4
    export_params(params, cfg, folder, meta=META, dtype="bfloat16", overwrite=True)
    assert check_export(folder, params, cfg) > 0  # within the bfloat16 tolerance
    export_params(params, cfg, folder, meta=META, overwrite=True)
    with open(os.path.join(folder, "fewstep.json")) as f:
        weights = os.path.join(folder, json.load(f)["weights"])
    state = load_file(weights)
    key = next(k for k in sorted(state) if k.endswith("emb_proj.weight") or k.endswith("conv1.weight"))
    state[key] = state[key] * 1.5
    save_file(state, weights)
    with pytest.raises(ValueError, match="differs from the JAX network"):
        check_export(folder, params, cfg)
