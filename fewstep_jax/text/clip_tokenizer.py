"""The CLIP BPE tokenizer of Stable Diffusion 1.5 / 2.1 / SDXL, on the `tokenizers` library (Rust),
read from a pipeline's tokenizer/ (or tokenizer_2/) folder.

Behaves as transformers 5.24's `CLIPTokenizer` called the way diffusers' encode_prompt calls it,
`tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`:
  special tokens (bos, eos, unk, pad, ... and the file's added tokens) are split out of the raw
  text first; the rest is NFC-normalised, whitespace runs become one space, lower-cased, split
  into CLIP's words (letter runs, single digits, punctuation runs, 's 't 're 've 'm 'll 'd),
  byte-level mapped and BPE-merged with the "</w>" end-of-word suffix; then
  [bos] + the first max_length - 2 tokens + [eos], right-padded with the pad token to max_length.
SD 1.5's tokenizer pads with <|endoftext|> (the eos); SD 2.1's and SDXL's second tokenizer pad
with "!" (id 0), which, being a special token, is also split out of the prompt text as id 0.

Files: vocab.json + merges.txt, or tokenizer.json (its vocab, merges and added tokens; its
normalizer / pre-tokenizer are not read: transformers' CLIPTokenizer rebuilds CLIP's own too);
tokenizer_config.json for model_max_length and the special tokens, which special_tokens_map.json
overrides unless tokenizer_config.json lists `added_tokens_decoder` (transformers' rule).

Use: `tok = load_clip_tokenizer("sd15/tokenizer")`, `tok(["a photo of a cat"])` ->
{"input_ids": int32 (B, 77), "attention_mask": int32 (B, 77)}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fewstep_jax.errors import UserError, require

# CLIP's word split (openai/CLIP simple_tokenizer), applied after normalisation
CLIP_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
END_OF_WORD = "</w>"
# transformers' named special-token attributes, in the order it registers them
SPECIAL_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# CLIPTokenizer's defaults for a folder that names none
DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


class CLIPTokenizer:
    """`tokenize(prompts)` (or call it) -> {"input_ids": int32 (B, L), "attention_mask": int32 (B, L)},
    L = max_length (the folder's model_max_length unless given)."""

    def __init__(self, backend: Any, *, bos_id: int, eos_id: int, pad_id: int, max_length: int) -> None:
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length = max_length

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        """Token ids of `prompts` (a str is one prompt), truncated to keep [bos] ... [eos] within
        max_length and right-padded to it; attention_mask is 1 on bos, the tokens and eos."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else max_length
        if length < 2:
            raise UserError(f"CLIP tokenizer: max_length={length} leaves no room for bos and eos")
        ids = np.full((len(prompts), length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for row, enc in enumerate(self.backend.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = [self.bos_id, *enc.ids[: length - 2], self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    __call__ = tokenize


def load_clip_tokenizer(folder: str, max_length: int | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer of a pipeline's tokenizer folder (see the module docstring for the
    files read). max_length overrides the folder's model_max_length. A missing file, a folder
    without model_max_length (and no max_length), or an added token whose listed id is not the
    one the vocabulary gives it is a UserError."""
    from fewstep_jax.pipelines.weights import read_json

    tokenizers = require("tokenizers", "the CLIP tokenizer")
    if not os.path.isdir(folder):
        raise UserError(f"tokenizer folder {folder!r} not found")
    path = lambda name: os.path.join(folder, name)
    if os.path.isfile(path("added_tokens.json")):
        raise UserError(f"{path('added_tokens.json')!r}: legacy added_tokens.json files are not supported")
    config = read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if config.get(key):
            raise UserError(f"{path('tokenizer_config.json')!r}: {key} are not supported")

    vocab, merges, file_added = _vocab_and_merges(folder, read_json)
    specials = _special_tokens(folder, config, read_json)
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=_content(specials["unk_token"]),
    )
    backend = tokenizers.Tokenizer(model)
    norm, pre = tokenizers.normalizers, tokenizers.pre_tokenizers
    backend.normalizer = norm.Sequence(
        [norm.NFC(), norm.Replace(tokenizers.Regex(r"\s+"), " "), norm.Lowercase()]
    )
    backend.pre_tokenizer = pre.Sequence(
        [
            pre.Split(tokenizers.Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre.ByteLevel(add_prefix_space=False),
        ]
    )
    added = _added_tokens(config, file_added, specials)
    for token, want_id in added:
        backend.add_tokens([tokenizers.AddedToken(**token)])
        got = backend.token_to_id(token["content"])
        if want_id is not None and got != want_id:
            raise UserError(
                f"tokenizer folder {folder!r}: added token {token['content']!r} has id {want_id} in its "
                f"files but {got} in the vocabulary"
            )
    # every special token is an added token now: a content outside the vocabulary got a new id
    ids = {
        key: backend.token_to_id(_content(specials[key])) for key in ("bos_token", "eos_token", "pad_token")
    }
    if max_length is None:
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 1_000_000:
            raise UserError(
                f"tokenizer folder {folder!r}: tokenizer_config.json gives no model_max_length "
                f"({max_length!r}); pass max_length"
            )
    return CLIPTokenizer(
        backend,
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        pad_id=ids["pad_token"],
        max_length=max_length,
    )


def _vocab_and_merges(
    folder: str, read_json: Any
) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """(vocab, merges, tokenizer.json's added tokens) from tokenizer.json, else vocab.json +
    merges.txt."""
    tok_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_json):
        data = read_json(tok_json)
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise UserError(f"{tok_json!r}: not a BPE tokenizer (model type {model.get('type')!r})")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return model["vocab"], merges, list(data.get("added_tokens") or [])
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    for p in (vocab_path, merges_path):
        if not os.path.isfile(p):
            raise UserError(
                f"tokenizer folder {folder!r} has neither tokenizer.json nor {os.path.basename(p)}"
            )
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # the first line is a "#version" header; a merge is two space-separated symbols
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise UserError(f"{merges_path!r}: lines {bad[:3]} are not 'a b' merges")
    return read_json(vocab_path), merges, []


def _special_tokens(folder: str, config: Mapping[str, Any], read_json: Any) -> dict[str, Any]:
    """{attribute: str or token dict} of the named special tokens: tokenizer_config.json's,
    overridden by special_tokens_map.json's unless the config lists added_tokens_decoder."""
    specials: dict[str, Any] = {k: config[k] for k in SPECIAL_ATTRIBUTES if config.get(k) is not None}
    map_path = os.path.join(folder, "special_tokens_map.json")
    if "added_tokens_decoder" not in config and os.path.isfile(map_path):
        specials.update({k: v for k, v in read_json(map_path).items() if k in SPECIAL_ATTRIBUTES and v})
    for key, value in DEFAULT_SPECIALS.items():
        specials.setdefault(key, value)
    return specials


def _content(token: str | Mapping[str, Any]) -> str:
    return token if isinstance(token, str) else str(token["content"])


def _token(spec: str | Mapping[str, Any], special: bool) -> dict[str, Any]:
    """A tokenizers.AddedToken's keyword arguments; an unflagged special token is matched in the
    raw text (normalized=False), an unflagged ordinary added token in the normalised text."""
    if isinstance(spec, str):
        return {"content": spec, "special": special, "normalized": not special}
    out = {"content": str(spec["content"]), "special": bool(spec.get("special", special))}
    for flag in _FLAGS:
        if spec.get(flag) is not None:
            out[flag] = bool(spec[flag])
    out.setdefault("normalized", not out["special"])
    return out


def _added_tokens(
    config: Mapping[str, Any], file_added: list[dict], specials: Mapping[str, Any]
) -> list[tuple[dict[str, Any], int | None]]:
    """[(AddedToken kwargs, id or None)] in transformers' order: the tokens the files list with
    their ids (tokenizer_config's added_tokens_decoder, else tokenizer.json's added_tokens), then
    each named special token whose content they lack; for a content named twice (eos, unk and pad
    are all <|endoftext|> in SD 1.5), the last attribute's flags win."""
    listed: dict[str, tuple[dict[str, Any], int | None]] = {}
    if "added_tokens_decoder" in config:
        for index, spec in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
            token = _token(spec, special=False)
            listed[token["content"]] = (token, int(index))
    else:
        for spec in file_added:
            token = _token({k: v for k, v in spec.items() if k != "id"}, special=False)
            listed[token["content"]] = (token, spec.get("id"))
    named: dict[str, tuple[dict[str, Any], int | None]] = {}
    for key in SPECIAL_ATTRIBUTES:
        if key in specials:
            token = _token(specials[key], special=True)
            if token["content"] not in listed:
                named[token["content"]] = (token, None)
    return [*listed.values(), *named.values()]
