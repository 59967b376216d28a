"""The CLIP tokenizer vs transformers' CLIPTokenizer read from the same folder, on a tiny BPE
vocabulary learned here from a few sentences, in the folder layouts SD pipelines have."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.text.clip_tokenizer import load_clip_tokenizer  # noqa: E402

SENTENCES = [
    "A photo of a cat sitting on the mat.",
    "a painting of an astronaut riding a horse, trending on artstation",
    "highly detailed portrait of a woman, 4k, octane render",
    "the quick brown fox jumps over the lazy dog!!",
    "a photograph of a cat and a dog playing in the garden",
    "café crème brûlée, naïve résumé",
]
PROMPTS = [
    "A photo of a CAT!!",
    "",
    "   leading and   trailing   ",
    "Café crème brûlée, naïve résumé — 日本語 😀",
    "e\u0301 vs \u00e9",  # NFC makes them one
    "4k 1920x1080 3.14 v2.0",
    "it's the dog's toy, they're here; we'll see",
    "tab\there\nnewline",
    "!!! wow! ok!",
    "hi <|ENDOFTEXT|> x a<|endoftext|>b <|startoftext|> <|STARTOFTEXT|>",
    " ".join(["a painting of an astronaut riding a horse"] * 12),  # > 77 tokens: truncated
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _learn_bpe(num_merges: int = 150) -> tuple[list[str], list[tuple[str, str]]]:
    """(vocab in CLIP's order: bytes, bytes + </w>, merges, specials; merges) by greedy BPE."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())  # "!" first: id 0
    to_bytes = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    words: collections.Counter = collections.Counter()
    for sentence in SENTENCES:
        for word in re.findall(r"[^\W\d_]+|\d|[^\w\s]+", sentence.lower()):
            mapped = to_bytes.pre_tokenize_str(word)[0][0]
            words[(*mapped[:-1], mapped[-1] + "</w>")] += 1
    vocab = alphabet + [a + "</w>" for a in alphabet]
    merges = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged: collections.Counter = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return [*vocab, BOS, EOS], merges


def _added(content: str, normalized: bool, legacy: bool = False) -> dict:
    token = {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }
    return {"__type": "AddedToken", **token} if legacy else {**token, "special": True}


def _write(folder, files: dict) -> str:
    os.makedirs(folder)
    for name, data in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    vocab, merges = _learn_bpe()
    ids = {t: i for i, t in enumerate(vocab)}
    base = {
        "vocab.json": ids,
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }
    root = tmp_path_factory.mktemp("tok")
    # SD 1.5's tokenizer/: AddedToken dicts (normalized) in both files, pad <|endoftext|>
    specials15 = {
        "bos_token": _added(BOS, True),
        "eos_token": _added(EOS, True),
        "unk_token": _added(EOS, True),
        "pad_token": EOS,
    }
    sd15_config = {
        **{
            k: (_added(str(v["content"]), True, legacy=True) if isinstance(v, dict) else v)
            for k, v in specials15.items()
        },
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "tokenizer_class": "CLIPTokenizer",
    }
    out = {
        "sd15": _write(
            root / "sd15",
            {**base, "tokenizer_config.json": sd15_config, "special_tokens_map.json": specials15},
        )
    }
    # SDXL's tokenizer_2/: pad "!" (id 0), added_tokens_decoder in tokenizer_config.json
    decoder = {str(ids[t]): _added(t, False) for t in ("!", BOS, EOS)}
    sdxl_config = {
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": "!",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    out["sdxl2"] = _write(
        root / "sdxl2",
        {**base, "tokenizer_config.json": sdxl_config, "special_tokens_map.json": {"pad_token": "!"}},
    )
    # normalized added tokens (matched after lower-casing); special_tokens_map.json's "!" must
    # be ignored next to an added_tokens_decoder
    norm_config = {
        **sdxl_config,
        "pad_token": EOS,
        "added_tokens_decoder": {str(ids[t]): _added(t, True) for t in (BOS, EOS)},
    }
    out["normalized"] = _write(
        root / "normalized",
        {**base, "tokenizer_config.json": norm_config, "special_tokens_map.json": {"pad_token": "!"}},
    )
    # a bare folder: CLIPTokenizer's default specials; special_tokens_map.json's pad "!" wins over
    # the config's; a short model_max_length
    out["bare"] = _write(
        root / "bare",
        {
            **base,
            "tokenizer_config.json": {"model_max_length": 16, "pad_token": EOS},
            "special_tokens_map.json": {"pad_token": "!"},
        },
    )
    # what transformers 5 writes: tokenizer.json + tokenizer_config.json
    for name in ("sd15", "sdxl2"):
        saved = str(root / f"{name}_saved")
        transformers.CLIPTokenizer.from_pretrained(out[name]).save_pretrained(saved)
        assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
        assert not os.path.isfile(os.path.join(saved, "vocab.json"))
        out[f"{name}_saved"] = saved
    return out


@pytest.mark.parametrize("name", ["sd15", "sdxl2", "normalized", "bare", "sd15_saved", "sdxl2_saved"])
def test_matches_transformers(folders, name):
    ref_tok = transformers.CLIPTokenizer.from_pretrained(folders[name])
    tok = load_clip_tokenizer(folders[name])
    length = ref_tok.model_max_length
    assert tok.max_length == length
    ref = ref_tok(PROMPTS, padding="max_length", max_length=length, truncation=True)
    out = tok(PROMPTS)
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (len(PROMPTS), length)
    for i, prompt in enumerate(PROMPTS):
        assert out["input_ids"][i].tolist() == ref["input_ids"][i], prompt
        assert out["attention_mask"][i].tolist() == ref["attention_mask"][i], prompt
    assert tok.pad_id == ref_tok.pad_token_id
    # the long prompt keeps bos ... eos at max_length
    assert out["input_ids"][-1, 0] == tok.bos_id and out["input_ids"][-1, -1] == tok.eos_id
    assert out["attention_mask"][-1].all()


def test_pad_spellings(folders):
    """SD 1.5 pads with <|endoftext|>; SDXL's tokenizer_2 with "!" = id 0, also split out of text."""
    sd15, sdxl = load_clip_tokenizer(folders["sd15"]), load_clip_tokenizer(folders["sdxl2"])
    assert sd15.pad_id == sd15.eos_id and sdxl.pad_id == 0
    a, b = sd15("cat!!")["input_ids"][0], sdxl("cat!!")["input_ids"][0]
    assert (a[3:] == sd15.eos_id).all()  # bos, cat</w>, !!</w>, eos, pads
    assert b[2:4].tolist() == [0, 0] and b[4] == sdxl.eos_id and (b[5:] == 0).all()
    single = sdxl.tokenize("a cat", max_length=8)
    assert single["input_ids"].shape == (1, 8) and single["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0, 0, 0, 0]
    ]


def test_errors(folders, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_clip_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=re.escape("neither tokenizer.json nor vocab.json")):
        load_clip_tokenizer(_write(tmp_path / "a", {"tokenizer_config.json": {"model_max_length": 77}}))
    vocab, merges = (_read(folders["sd15"], n) for n in ("vocab.json", "merges.txt"))
    base = {"vocab.json": vocab, "merges.txt": merges}
    with pytest.raises(UserError, match="no model_max_length"):
        load_clip_tokenizer(_write(tmp_path / "b", {**base, "tokenizer_config.json": {}}))
    assert load_clip_tokenizer(folders["sd15"], max_length=20).max_length == 20
    cfg = _read(folders["sdxl2"], "tokenizer_config.json")
    cfg["added_tokens_decoder"]["5"] = cfg["added_tokens_decoder"].pop(str(vocab[EOS]))
    with pytest.raises(UserError, match=f"has id 5 in its files but {vocab[EOS]}"):
        load_clip_tokenizer(_write(tmp_path / "c", {**base, "tokenizer_config.json": cfg}))


def _read(folder: str, name: str):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f) if name.endswith(".json") else f.read()
