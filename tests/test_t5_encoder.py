"""T5Encoder vs transformers' T5EncoderModel on tiny random configs (T5 relu, T5 v1.1 gated-gelu, ...)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.models.t5_encoder import (  # noqa: E402
    load_t5_encoder,
    relative_position_bucket,
    t5_encoder_to_torch,
)

B, L, VOCAB = 2, 20, 100
TINY = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "d_kv": 8,
    "num_heads": 4,
    "d_ff": 37,
    "num_layers": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}
# feed_forward_proj -> transformers' (dense_act_fn, is_gated_act): relu (T5), gelu_new gated
# (T5 v1.1 / flan-T5 / t5-v1_1-xxl), plus exact gelu and gated silu
PROJECTIONS = ("relu", "gated-gelu", "gelu", "gated-silu")


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    """ids (B, L) and a mask keeping all of row 0 and the first 13 tokens of row 1."""
    ids = np.random.RandomState(0).randint(0, VOCAB, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[1, 13:] = 0
    return ids, mask


def _reference(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(input_ids=torch.tensor(ids), **kw).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{feed_forward_proj: (saved folder, torch model)}."""
    out = {}
    for i, proj in enumerate(PROJECTIONS):
        torch.manual_seed(i)
        model = transformers.T5EncoderModel(transformers.T5Config(**TINY, feed_forward_proj=proj)).eval()
        with torch.no_grad():  # layer norms away from 1, logits large enough for the scaling to matter
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        folder = str(tmp_path_factory.mktemp(proj))
        model.save_pretrained(folder)
        out[proj] = (folder, model)
    return out


def _apply(module, params, ids, mask=None) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))


@pytest.mark.parametrize("proj", PROJECTIONS)
def test_parity_fp32(models, proj):
    """All positions, padded ones included (transformers computes them from the unmasked keys),
    with the tokenizer's mask and without one (SD3 / Flux)."""
    folder, model = models[proj]
    module, params = load_t5_encoder(folder)
    expected = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True), "gelu": ("gelu", False)}
    assert (module.dense_act_fn, module.is_gated_act) == expected.get(proj, ("silu", True))
    ids, mask = _inputs()
    for m in (mask, None):
        ref = _reference(model, ids, m)
        out = _apply(module, params, ids, m)
        assert out.shape == (B, L, 32) and out.dtype == np.float32
        assert np.abs(out - ref).max() < 1e-5, (proj, m is None, np.abs(out - ref).max())
    # the mask matters: row 1 differs from the unmasked run
    assert np.abs(_apply(module, params, ids, mask)[1] - _apply(module, params, ids)[1]).max() > 1e-3


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16), (64, 256), (16, 100), (6, 10)])
def test_relative_position_bucket(buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-3000, 3001)
    ref = T5Attention._relative_position_bucket(torch.tensor(rel), True, buckets, distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(rel, buckets, distance), ref)


def test_bf16(models):
    """bf16 compute (params stay float32) within 5% of the output scale."""
    folder, model = models["gated-gelu"]
    module, params = load_t5_encoder(folder, dtype="bfloat16")
    assert module.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == np.float32
    ids, mask = _inputs()
    ref = _reference(model, ids, mask)
    out = _apply(module, params, ids, mask)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), np.abs(out - ref).max()


def test_export_round_trip(models):
    folder, model = models["gated-gelu"]
    _, params = load_t5_encoder(folder)
    state = {k: torch.tensor(v) for k, v in t5_encoder_to_torch(params).items()}
    fresh = transformers.T5EncoderModel(model.config).eval()
    fresh.load_state_dict(state, strict=True)
    ids, mask = _inputs()
    np.testing.assert_array_equal(_reference(fresh, ids, mask), _reference(model, ids, mask))


def test_sharded_weights(models, tmp_path):
    _, model = models["relu"]
    folder = str(tmp_path / "sharded")
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json")) and len(shards) > 1
    module, params = load_t5_encoder(folder)
    ids, mask = _inputs()
    assert np.abs(_apply(module, params, ids, mask) - _reference(model, ids, mask)).max() < 1e-5


def _copy(folder: str, dst: str, edit_config=None, edit_state=None) -> str:
    os.makedirs(dst)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, "model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(state)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


def test_real_checkpoint_layout(models, tmp_path):
    """A t5-v1_1-xxl-style config (encoder-decoder keys, tie_word_embeddings false, torch_dtype) and
    a state holding the tied encoder.embed_tokens.weight and decoder / lm_head keys loads; the tied
    key alone stands in for shared.weight."""
    folder, model = models["gated-gelu"]
    real_keys = {
        "architectures": ["T5EncoderModel"],
        "decoder_start_token_id": 0,
        "is_encoder_decoder": True,
        "num_decoder_layers": 24,
        "output_past": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "_name_or_path": "google/t5-v1_1-xxl",
    }

    def add_keys(state):
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
        state["decoder.final_layer_norm.weight"] = np.ones(32, np.float32)
        state["lm_head.weight"] = np.zeros((VOCAB, 32), np.float32)

    def only_tied(state):
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight")

    ids, mask = _inputs()
    ref = _reference(model, ids, mask)
    for name, edit in (("full", add_keys), ("tied", only_tied)):
        dst = _copy(folder, str(tmp_path / name), edit_config=lambda c: c.update(real_keys), edit_state=edit)
        module, params = load_t5_encoder(dst)
        assert np.abs(_apply(module, params, ids, mask) - ref).max() < 1e-5


def test_errors_name_the_option_or_key(models, tmp_path):
    folder, _ = models["relu"]
    bad = _copy(folder, str(tmp_path / "a"), edit_config=lambda c: c.update(use_flash_attn=True))
    with pytest.raises(UserError, match="unknown option 'use_flash_attn'"):
        load_t5_encoder(bad)
    bad = _copy(folder, str(tmp_path / "b"), edit_config=lambda c: c.update(is_decoder=True))
    with pytest.raises(UserError, match="is_decoder=True is not supported"):
        load_t5_encoder(bad)
    bad = _copy(
        folder,
        str(tmp_path / "c"),
        edit_config=lambda c: c.update(feed_forward_proj="gated-swish", dense_act_fn="swish"),
    )
    with pytest.raises(UserError, match="activation 'swish' is not supported"):
        load_t5_encoder(bad)
    key = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
    bad = _copy(folder, str(tmp_path / "d"), edit_state=lambda s: s.pop(key))
    with pytest.raises(UserError, match=f"missing keys \\['{key}'\\]"):
        load_t5_encoder(bad)
    bad = _copy(
        folder, str(tmp_path / "e"), edit_state=lambda s: s.update({key: np.zeros((37, 16), np.float32)})
    )
    with pytest.raises(UserError, match=f"shape mismatch at '{key}'"):
        load_t5_encoder(bad)
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    bad = _copy(
        folder, str(tmp_path / "f"), edit_state=lambda s: s.update({extra: np.zeros((8, 4), np.float32)})
    )
    with pytest.raises(UserError, match=f"unexpected keys \\['{extra}'\\]"):
        load_t5_encoder(bad)
    bad = _copy(folder, str(tmp_path / "g"))
    os.remove(os.path.join(bad, "model.safetensors"))
    with pytest.raises(UserError, match="no safetensors weights"):
        load_t5_encoder(bad)
    os.remove(os.path.join(bad, "config.json"))
    with pytest.raises(UserError, match=r"config\.json' not found"):
        load_t5_encoder(bad)
