"""CLIP text encoders vs transformers' CLIPTextModel / CLIPTextModelWithProjection on tiny random
configs (SD 1.5 CLIP-L-like quick_gelu, SD 2.1-like gelu with the newer eos rule, SDXL
encoder-2-like with projection), and the SD / SDXL prompt-embedding helpers vs diffusers'
encode_prompt computation written in torch."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.clip_text import (  # noqa: E402
    clip_text_to_torch,
    load_clip_text_encoder,
    sd_text_states,
    sdxl_text_states,
)

VOCAB, BOS, EOS, NEW_EOS = 100, 98, 99, 97
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "bos_token_id": BOS,
    "pad_token_id": 1,
}
CONFIGS = {
    # SD 1.5's CLIP-L: quick_gelu, the legacy eos_token_id=2 (pool at argmax of the ids)
    "clip_l": ("CLIPTextModel", {**TINY, "hidden_act": "quick_gelu", "eos_token_id": 2}),
    # SD 2.1-like: gelu, an eos_token_id pooled at its first occurrence, 16 positions
    "clip_h": (
        "CLIPTextModel",
        {**TINY, "hidden_act": "gelu", "eos_token_id": NEW_EOS, "max_position_embeddings": 16},
    ),
    # SDXL's encoder 2: gelu, projection, another width (the SDXL concat must keep the order)
    "clip_g": (
        "CLIPTextModelWithProjection",
        {**TINY, "hidden_size": 48, "hidden_act": "gelu", "eos_token_id": 2, "projection_dim": 16},
    ),
}


def _inputs(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, keep mask) of 3 rows: eos-padded, random (where the two pooling rules disagree),
    "!"-padded; the mask right-pads rows 0 and 2 and left-pads row 1 (its first queries see no key)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, NEW_EOS, size=(3, length))
    ids[:, 0] = BOS
    ids[0, 6:] = EOS
    ids[1, [3, 5, 9]] = [2, NEW_EOS, EOS]
    ids[2, 7], ids[2, 8:] = EOS, 0
    mask = np.ones_like(ids)
    mask[0, 7:], mask[1, :2], mask[2, 8:] = 0, 0, 0
    # row 1 must tell the rules apart: argmax of the ids (legacy) vs the first NEW_EOS
    assert np.argmax(ids[1]) != np.argmax(ids[1] == NEW_EOS) != np.argmax(ids[1] == 2)
    return ids.astype(np.int32), mask.astype(np.int32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (folder saved by transformers, torch model)}."""
    out = {}
    for i, (name, (arch, cfg)) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = getattr(transformers, arch)(transformers.CLIPTextConfig(**cfg)).eval()
        with torch.no_grad():  # layer norms and biases away from their 1 / 0 initialisation
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def _torch(model, ids, mask=None):
    with torch.no_grad():
        m = None if mask is None else torch.tensor(mask, dtype=torch.long)
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=m, output_hidden_states=True)


@pytest.fixture(scope="module")
def loaded(folders):
    """{name: (module, params, jitted apply(params, ids, mask))}: one compile per mask kind."""
    out = {}
    for name, (folder, _) in folders.items():
        module, params = load_clip_text_encoder(folder)
        out[name] = (module, params, jax.jit(lambda p, i, m, mod=module: mod.apply({"params": p}, i, m)))
    return out


def _apply(loaded, name, ids, mask=None):
    _, params, fn = loaded[name]
    return fn(params, ids, mask)


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b.numpy(), np.float32)).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(folders, loaded, name):
    """Every output against torch, without a mask (an all-ones mask: transformers then drops it)
    and with right and left padding."""
    _, model = folders[name]
    module = loaded[name][0]
    ids, mask = _inputs(module.max_position_embeddings)
    for torch_mask, jax_mask in ((None, np.ones_like(mask)), (mask, mask)):
        ref, out = _torch(model, ids, torch_mask), _apply(loaded, name, ids, jax_mask)
        assert out.last_hidden_state.dtype == jnp.float32
        assert _err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for mine, theirs in zip(out.hidden_states, ref.hidden_states):
            assert _err(mine, theirs) < 1e-5
        if CONFIGS[name][0] == "CLIPTextModel":
            assert out.text_embeds is None
            assert _err(out.pooler_output, ref.pooler_output) < 1e-5
        else:  # the WithProjection output has no pooler_output: its text_embeds project it
            assert _err(out.text_embeds, ref.text_embeds) < 1e-5


def test_sd_text_states_match_encode_prompt(folders, loaded):
    """StableDiffusionPipeline.encode_prompt: [0] without clip_skip; with it, the final LayerNorm
    of hidden_states[-(clip_skip + 1)] (diffusers reaches it as text_model.final_layer_norm)."""
    model = folders["clip_l"][1]
    ids, _ = _inputs(77)
    ref = _torch(model, ids)
    out = _apply(loaded, "clip_l", ids)
    with torch.no_grad():
        skip1 = model.final_layer_norm(ref.hidden_states[-2])
    assert _err(sd_text_states(out), ref[0]) < 1e-5
    assert _err(sd_text_states(out, clip_skip=1), skip1) < 1e-5
    assert _err(sd_text_states(out, clip_skip=0), ref[0]) < 1e-5
    with pytest.raises(UserError, match="clip_skip=3"):
        sd_text_states(out, clip_skip=3)


def test_sdxl_text_states_match_encode_prompt(folders, loaded):
    """StableDiffusionXLPipeline.encode_prompt: concat of both encoders' hidden_states[-2]
    (hidden_states[-(clip_skip + 2)] with clip_skip), pooled = encoder 2's [0] (text_embeds)."""
    m1, m2 = folders["clip_l"][1], folders["clip_g"][1]
    ids, _ = _inputs(77)
    ref1, ref2 = _torch(m1, ids), _torch(m2, ids)
    out1, out2 = _apply(loaded, "clip_l", ids), _apply(loaded, "clip_g", ids)
    for skip in (None, 1):
        index = -2 if skip is None else -(skip + 2)
        embeds, pooled = sdxl_text_states(out1, out2, clip_skip=skip)
        want = torch.concat([ref1.hidden_states[index], ref2.hidden_states[index]], dim=-1)
        assert embeds.shape == (3, 77, 32 + 48)
        assert _err(embeds, want) < 1e-5 and _err(pooled, ref2[0]) < 1e-5
    embeds, _ = sdxl_text_states(None, out2)  # the refiner: text_encoder_2 alone
    assert _err(embeds, ref2.hidden_states[-2]) < 1e-5
    with pytest.raises(ValueError, match="no text_projection"):
        sdxl_text_states(out2, out1)


def test_bf16_compute(folders):
    """bf16 compute (params stay float32) within 5% of the output scale."""
    folder, model = folders["clip_g"]
    module, params = load_clip_text_encoder(folder, dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    ids, mask = _inputs(77)
    ref = _torch(model, ids, mask)
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    for mine, theirs in ((out.last_hidden_state, ref.last_hidden_state), (out.text_embeds, ref.text_embeds)):
        assert _err(mine, theirs) < 0.05 * float(theirs.abs().max())


def test_large_residual_stream(folders, tmp_path):
    """CLIP's residual stream carries channels in the hundreds: the layer norms must keep float32
    digits there (a one-pass E[x^2] - E[x]^2 variance is off by ~3 at this offset)."""
    model = folders["clip_l"][1]
    big = type(model)(model.config).eval()
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        big.embeddings.token_embedding.weight.add_(300.0)
    big.save_pretrained(str(tmp_path / "big"))
    module, params = load_clip_text_encoder(str(tmp_path / "big"))
    ids, _ = _inputs(16)
    out = module.apply({"params": params}, ids)
    assert _err(out.last_hidden_state, _torch(big, ids).last_hidden_state) < 1e-2


def _copy(folder: str, dst: str, edit_config=None, edit_state=None) -> str:
    os.makedirs(dst)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, "model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        state = edit_state(state) or state
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


def test_both_key_spellings_and_old_configs(folders, tmp_path):
    """transformers 5 writes a CLIPTextModel without the `text_model.` prefix; SD folders have it
    (and older ones the position_ids buffer and generic PretrainedConfig keys): same params."""
    folder, _ = folders["clip_l"]
    assert not any(k.startswith("text_model.") for k in load_file(os.path.join(folder, "model.safetensors")))

    def old_style(state):
        state = {f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        return state

    def old_config(config):
        config.update(
            _name_or_path="openai/clip-vit-large-patch14",
            dropout=0.0,
            torch_dtype="float32",
            output_hidden_states=False,
            num_beams=1,
            id2label={"0": "LABEL_0"},
            pruned_heads={},
        )

    old = _copy(folder, str(tmp_path / "old"), edit_config=old_config, edit_state=old_style)
    (_, new_params), (_, old_params) = load_clip_text_encoder(folder), load_clip_text_encoder(old)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(old_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(new_params) == jax.tree.structure(old_params)

    # a WithProjection state dict stripped of the prefix keeps text_projection at the top level
    folder, _ = folders["clip_g"]
    strip = lambda s: {k.removeprefix("text_model."): v for k, v in s.items()}
    stripped = _copy(folder, str(tmp_path / "stripped"), edit_state=strip)
    (_, want), (_, got) = load_clip_text_encoder(folder), load_clip_text_encoder(stripped)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_export_round_trip(folders, name, tmp_path):
    """clip_text_to_torch loads strictly into the torch model; its checkpoint spelling loads
    through transformers' from_pretrained and gives the same outputs."""
    folder, model = folders[name]
    module, params = load_clip_text_encoder(folder)
    plain = name == "clip_l"  # transformers 5's CLIPTextModel state dict has no prefix
    state = clip_text_to_torch(params, text_model_prefix=not plain)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())

    ckpt = clip_text_to_torch(params)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in ckpt)
    dst = _copy(folder, str(tmp_path / "ckpt"), edit_state=lambda _: ckpt)
    loaded = type(model).from_pretrained(dst).eval()
    ids, _ = _inputs(module.max_position_embeddings)
    assert _err(_torch(model, ids)[0], _torch(loaded, ids)[0]) == 0.0


def test_errors_name_the_option_file_or_key(folders, tmp_path):
    folder, _ = folders["clip_l"]
    cases = [
        (lambda c: c.update(use_flash_attn=True), "unknown option 'use_flash_attn'"),
        (lambda c: c.update(hidden_act="relu"), "hidden_act 'relu'"),
        (lambda c: c.update(eos_token_id=[2, 3]), "eos_token_id must be one int"),
        (lambda c: c.update(architectures=["CLIPVisionModel"]), "architectures=\\['CLIPVisionModel'\\]"),
        (
            lambda c: c.update(model_type="clip_vision_model"),
            "model_type='clip_vision_model' is not supported",
        ),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(UserError, match=match):
            load_clip_text_encoder(_copy(folder, str(tmp_path / f"c{i}"), edit_config=edit))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape("config.json' not found")):
        load_clip_text_encoder(str(empty))
    (empty / "config.json").write_text(json.dumps(CONFIGS["clip_l"][1]))
    with pytest.raises(UserError, match="no safetensors weights"):
        load_clip_text_encoder(str(empty))

    # keys are named in the file's own spelling, with or without the text_model. prefix
    for prefix in ("", "text_model."):
        key = f"{prefix}encoder.layers.1.self_attn.k_proj.weight"
        respell = lambda s, p=prefix: {p + k: v for k, v in s.items()}
        bad = _copy(
            folder, str(tmp_path / f"m{prefix}"), edit_state=lambda s, k=key, r=respell: _pop(r(s), k)
        )
        with pytest.raises(UserError, match=f"missing keys \\['{key}'\\]"):
            load_clip_text_encoder(bad)
        key = f"{prefix}encoder.layers.0.mlp.fc1.weight"
        bad = _copy(
            folder,
            str(tmp_path / f"s{prefix}"),
            edit_state=lambda s, k=key, r=respell: {**r(s), k: np.zeros((37, 16), np.float32)},
        )
        with pytest.raises(UserError, match=f"shape mismatch at '{key}'"):
            load_clip_text_encoder(bad)
    bad = _copy(
        folder, str(tmp_path / "u"), edit_state=lambda s: {**s, "text_projection.weight": np.zeros(1)}
    )
    with pytest.raises(UserError, match=re.escape("unexpected keys ['text_projection.weight']")):
        load_clip_text_encoder(bad)


def _pop(state: dict, key: str) -> dict:
    state.pop(key)
    return state
