"""The T5 tokenizer of a pipeline folder (PixArt `tokenizer/`, SD3 `tokenizer_3/`, Flux
`tokenizer_2/`), read with the `sentencepiece` library, as diffusers' pipelines call transformers'
T5 tokenizer: padding="max_length", truncation=True, add_special_tokens=True.

Why sentencepiece: `spiece.model` is in every one of those folders (PixArt's has no
`tokenizer.json`), it is T5's own tokenizer, and transformers 5.24 builds its T5 tokenizer from the
same pieces, scores and normalisation (its Unigram + Precompiled charsmap reproduce sentencepiece's
encoding), so one code path serves all folders; `tokenizer.json`, if present, is not read. A folder
without `spiece.model` (transformers >= 5 `save_pretrained` writes only tokenizer.json) is a
UserError.

Behaviour of transformers' `T5Tokenizer` (= `T5TokenizerFast`) reproduced here:
  - special-token strings in the text (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`, tokens of
    `added_tokens_decoder`) are matched on the raw text and become their ids; the text between
    them is encoded chunk by chunk, each chunk with sentencepiece's dummy-prefix "▁";
  - a Unicode White_Space character that the model's normalisation keeps (U+0085 under T5's
    nmt_nfkc) separates words, as transformers splits on White_Space after normalising; the
    others are mapped (to a space, or dropped like U+000B) by the normalisation itself;
  - truncation to max_length - 1 pieces, then `</s>`; then `<pad>` up to max_length; attention
    mask 1 on the pieces and `</s>`. A text already ending in `</s>` still gets one appended.
Not reproduced: full-width spellings of special tokens (`＜pad＞`), which transformers' Unigram
turns into the special id after NFKC normalisation, are plain text here; `single_word` added
tokens. PixArt's pipeline also cleans captions (`clean_caption`: URLs, HTML, ...) before
tokenising; that is not done here.

Use: `tok = load_t5_tokenizer("pixart/tokenizer", max_length=120)`; `tok(["a cat"])` ->
{"input_ids": (B, 120) int32, "attention_mask": (B, 120) int32}. max_length: 120 PixArt-alpha,
300 PixArt-Sigma, 256 / 512 SD3 and Flux.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fewstep_jax.errors import MissingPackageError, UserError

MODEL_FILE = "spiece.model"
TOKENIZER_CLASSES = (None, "T5Tokenizer", "T5TokenizerFast")
# Unicode White_Space (Rust's char::is_whitespace, which the tokenizers' WhitespaceSplit uses)
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_EXTRA_ID = re.compile(r"<extra_id_(\d+)>")


class T5Tokenizer:
    """Callable: prompts (list of str, or one str) -> {"input_ids", "attention_mask"}, each
    (B, max_length) int32 numpy.

    processor: a `sentencepiece.SentencePieceProcessor`; special: {token string: id} of the
    strings matched in the text.
    """

    def __init__(self, processor: Any, max_length: int, special: Mapping[str, int], eos_id: int, pad_id: int):
        if max_length < 1:
            raise UserError(f"T5 tokenizer: max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.max_length = int(max_length)
        self.special = dict(special)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        # longest first, so that a token containing another (none in T5) would win
        names = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        kept = [c for c in WHITESPACE if c in processor.normalize(f"a{c}b")]
        self._whitespace = re.compile(f"[{''.join(kept)}]") if kept else None

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without `</s>`, truncation or padding."""
        if not isinstance(text, str):
            raise UserError(f"T5 tokenizer: a prompt must be a str, got {type(text).__name__}")
        if self._whitespace is not None:
            text = self._whitespace.sub(" ", text)
        if self._special_re is None:
            return list(self.processor.encode(text))
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids += self.processor.encode(text[start : match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        return ids + list(self.processor.encode(text[start:]))

    def __call__(self, prompts: str | Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, text in enumerate(prompts):
            ids = [*self.encode(text)[: self.max_length - 1], self.eos_id]
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f"{path!r} is not valid JSON: {err}") from None


def _content(token: Any) -> str:
    """A token entry: a string, or an AddedToken dict {"content": ...}."""
    return str(token["content"]) if isinstance(token, Mapping) else str(token)


def _token_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):  # transformers 5 may store extra_special_tokens as a dict
        value = list(value.values())
    if isinstance(value, (str, Mapping)):
        value = [value]
    return [_content(v) for v in value]


def load_t5_tokenizer(folder: str, max_length: int) -> T5Tokenizer:
    """The T5 tokenizer of a pipeline tokenizer folder (spiece.model, tokenizer_config.json,
    special_tokens_map.json); options that would change the ids and are not implemented
    (another tokenizer_class, sp_model_kwargs, left padding / truncation) are UserErrors."""
    if not os.path.isdir(folder):
        raise UserError(f"tokenizer folder {folder!r} not found")
    model_path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(model_path):
        raise UserError(
            f"{folder!r} has no {MODEL_FILE} (the T5 sentencepiece model this project reads; a folder "
            "with only tokenizer.json is not supported)"
        )
    try:
        import sentencepiece
    except ModuleNotFoundError as err:
        raise MissingPackageError(
            "the T5 tokenizer needs sentencepiece, which is not installed: pip install sentencepiece"
        ) from err
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read(config_path)
    special_map = _read(os.path.join(folder, "special_tokens_map.json"))
    what = f"{config_path} (T5 tokenizer)"

    if config.get("tokenizer_class") not in TOKENIZER_CLASSES:
        raise UserError(f"{what}: tokenizer_class {config['tokenizer_class']!r} is not a T5 tokenizer")
    if config.get("sp_model_kwargs"):
        raise UserError(f"{what}: sp_model_kwargs={config['sp_model_kwargs']!r} is not supported")
    for side in ("padding_side", "truncation_side"):
        if config.get(side, "right") != "right":
            raise UserError(f"{what}: {side}={config[side]!r} is not supported (only 'right')")

    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    size = processor.get_piece_size()

    def piece_id(token: str) -> int | None:
        i = processor.piece_to_id(token)
        return i if processor.id_to_piece(i) == token else None

    # special_tokens_map.json takes precedence over tokenizer_config.json, as in transformers
    tokens = {
        name: _content(special_map.get(name, config.get(name, default)))
        for name, default in (("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "<unk>"))
    }
    added = {_content(v): int(k) for k, v in (config.get("added_tokens_decoder") or {}).items()}
    extra_ids = int(config.get("extra_ids", 100))
    names = [
        *tokens.values(),
        *added,
        *(f"<extra_id_{i}>" for i in range(extra_ids)),
        *_token_list(config.get("additional_special_tokens")),
        *_token_list(config.get("extra_special_tokens")),
        *_token_list(special_map.get("additional_special_tokens")),
    ]
    special: dict[str, int] = {}
    for name in names:
        if name in special:
            continue
        if name in added:
            special[name] = added[name]
        elif (i := piece_id(name)) is not None:
            special[name] = i
        elif (m := _EXTRA_ID.fullmatch(name)) and int(m.group(1)) < extra_ids:
            # T5's sentinels follow the sentencepiece vocab in reverse: <extra_id_0> is the last id
            special[name] = size + extra_ids - 1 - int(m.group(1))
        else:
            raise UserError(
                f"{what}: special token {name!r} is neither a piece of {MODEL_FILE} nor given an id"
            )
    for name in ("eos_token", "pad_token"):
        if piece_id(tokens[name]) is None and tokens[name] not in added:
            raise UserError(f"{what}: {name} {tokens[name]!r} is not a piece of {model_path}")
    return T5Tokenizer(
        processor,
        max_length,
        special,
        eos_id=special[tokens["eos_token"]],
        pad_id=special[tokens["pad_token"]],
    )
