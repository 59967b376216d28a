"""The sentencepiece T5 tokenizer vs transformers' T5Tokenizer / T5TokenizerFast, on a tiny unigram
model trained here, in the folder layouts of PixArt (spiece.model + configs) and SD3 / Flux
(plus tokenizer.json and a transformers 4.x added_tokens_decoder)."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.text.t5_tokenizer import load_t5_tokenizer  # noqa: E402

CORPUS = [
    "A photo of a cat sitting on a red chair.",
    "An astronaut riding a horse on the moon, digital art!",
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait, naïve façade — résumé.",
    "Two dogs playing in the snow; high resolution, 4k.",
    "A watercolor painting of a lighthouse at dusk.",
    "Portrait of an old man with a long white beard",
    "A bowl of ramen with eggs and green onions",
    "Sunset over the mountains, golden hour, cinematic lighting",
    "A futuristic city skyline at night with neon lights",
    "a small robot holding a flower",
    "Abstract shapes in blue and orange",
    "A cozy cabin in the woods covered with snow",
    "Close-up of a hummingbird drinking nectar",
    "An oil painting of a ship in a storm",
    "Tokyo street at night in the rain",
    "A plate of sushi on a wooden table",
    "A child flying a kite on the beach",
    "Macro photo of a dew drop on a leaf",
    "Medieval castle on a hill, fantasy art",
    "A steaming cup of coffee next to a book",
    "Vintage car parked by the sea",
    "Snowy owl perched on a branch",
    "A field of sunflowers under a blue sky",
    "Neon sign that says OPEN",
    "Ancient ruins in the jungle",
    "A polar bear swimming in icy water",
    "Pixel art of a dragon",
    "Two cats sleeping together",
    "A desert landscape with cacti and a full moon",
    "Hot air balloons over the valley",
    "The Eiffel Tower in springtime",
]
EXTRA_IDS = 100
WHITESPACE = "\t\n\x0b\x0c\r\x85\xa0\u1680\u2002\u2028\u2029\u202f\u205f\u3000\u200b\x1c\x1f\ufeff\u00ad"
PROMPTS = [
    "A photo of a Cat!",
    "UPPER lower MiXeD case",
    "punctuation... ,;:!? (brackets) [x] {y} 'quotes' \"double\"",
    "Café naïve ünïcödé 日本語 😀 e\u0301 ﬁ ½ \uff21\uff22\uff23",
    "  extra   spaces\tand\nnewlines  ",
    " leading",
    "trailing ",
    "",
    "a " * 100,
    "</s> inside <extra_id_0> text",
    "x<pad>y<unk>z",
    "a <extra_id_5>. b<extra_id_99>c <extra_id_100>",
    "hello</s>",
    *(f"a{c}b{c}" for c in WHITESPACE),
]


def _train(path: str) -> None:
    """A unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3),
        model_writer=model,
        vocab_size=150,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def _write(folder: str, name: str, obj: dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f)


SPECIAL = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
EXTRA = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{layout: tokenizer folder}."""
    root = tmp_path_factory.mktemp("t5tok")
    pixart = str(root / "pixart")  # spiece.model + configs, as PixArt-alpha / Sigma ship them
    os.makedirs(pixart)
    _train(os.path.join(pixart, "spiece.model"))
    config = {**SPECIAL, "extra_ids": EXTRA_IDS, "additional_special_tokens": EXTRA, "legacy": False}
    _write(
        pixart, "tokenizer_config.json", {**config, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}
    )
    _write(pixart, "special_tokens_map.json", {**SPECIAL, "additional_special_tokens": EXTRA})

    # SD3 / Flux: plus tokenizer.json, and a transformers 4.x tokenizer_config with added_tokens_decoder
    # (sentinels lstrip / rstrip, after the 150 pieces in reverse)
    sd3 = str(root / "sd3")
    transformers.T5Tokenizer.from_pretrained(pixart).save_pretrained(sd3)
    shutil.copy(os.path.join(pixart, "spiece.model"), sd3)
    token = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    added = {str(i): {**token, "content": t} for i, t in enumerate(("<pad>", "</s>", "<unk>"))}
    for i in range(EXTRA_IDS):
        added[str(150 + EXTRA_IDS - 1 - i)] = {**token, "content": EXTRA[i], "lstrip": True, "rstrip": True}
    sd3_config = {
        **config,
        "added_tokens_decoder": added,
        "legacy": True,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    _write(sd3, "tokenizer_config.json", sd3_config)
    _write(sd3, "special_tokens_map.json", {**SPECIAL, "additional_special_tokens": EXTRA})
    return {"pixart": pixart, "sd3": sd3}


@pytest.mark.parametrize("layout", ["pixart", "sd3"])
@pytest.mark.parametrize("max_length", [8, 120])
def test_matches_transformers(folders, layout, max_length):
    """As diffusers' PixArt / SD3 / Flux pipelines call it; max_length 8 truncates most prompts."""
    mine = load_t5_tokenizer(folders[layout], max_length)(PROMPTS)
    assert mine["input_ids"].dtype == np.int32 and mine["input_ids"].shape == (len(PROMPTS), max_length)
    for cls in {transformers.T5Tokenizer, transformers.T5TokenizerFast}:
        ref = cls.from_pretrained(folders[layout])(
            PROMPTS,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="np",
        )
        for key in ("input_ids", "attention_mask"):
            bad = [p for p, a, b in zip(PROMPTS, mine[key], ref[key]) if not np.array_equal(a, b)]
            assert not bad, (cls.__name__, key, bad)


def test_one_prompt_and_specials(folders):
    tok = load_t5_tokenizer(folders["pixart"], 6)
    out = tok("a <extra_id_0>")
    assert out["input_ids"].shape == (1, 6)
    # <extra_id_0> is the last sentinel after the 150 pieces; </s> = 1 ends it, <pad> = 0 fills
    assert out["input_ids"][0, 1:].tolist() == [150 + EXTRA_IDS - 1, 1, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_errors(folders, tmp_path):
    only_json = str(tmp_path / "only_json")
    shutil.copytree(folders["sd3"], only_json)
    os.remove(os.path.join(only_json, "spiece.model"))
    with pytest.raises(UserError, match=r"has no spiece\.model"):
        load_t5_tokenizer(only_json, 16)
    with pytest.raises(UserError, match="not found"):
        load_t5_tokenizer(str(tmp_path / "missing"), 16)
    for i, (key, value, message) in enumerate(
        [
            ("tokenizer_class", "CLIPTokenizer", "not a T5 tokenizer"),
            ("padding_side", "left", "padding_side='left' is not supported"),
            ("sp_model_kwargs", {"enable_sampling": True}, "sp_model_kwargs"),
            ("additional_special_tokens", ["<mine>"], "special token '<mine>'"),
        ]
    ):
        bad = str(tmp_path / f"bad{i}")
        shutil.copytree(folders["pixart"], bad)
        with open(os.path.join(bad, "tokenizer_config.json")) as f:
            config = json.load(f)
        _write(bad, "tokenizer_config.json", {**config, key: value})
        with pytest.raises(UserError, match=message):
            load_t5_tokenizer(bad, 16)
    with pytest.raises(UserError, match="max_length must be >= 1"):
        load_t5_tokenizer(folders["pixart"], 0)
