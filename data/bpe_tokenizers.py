"""BPE tokenizers with Llama 4's special-token layout: tiktoken ranks files and HF tokenizer.json.

`TiktokenTokenizer` reads a tiktoken ranks file (Llama 4's `tokenizer.model`) and lays out the
2048 Llama 4 special tokens after the ranks; `HFTokenizer` reads an HF `tokenizer.json` and finds
the same specials by name. Both share `data.tokenizer.Tokenizer`'s interface and its rule that
special-token strings inside text stay plain text.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

from data.tokenizer import SpecialTokens, _readable_bytes, _require

# ---------------------------------------------------------------------------------------------
# Llama 4 special-token layout and pre-tokenization pattern
# ---------------------------------------------------------------------------------------------

# Llama 4's pre-tokenization regex, verbatim from Meta's reference tokenizer
# (meta-llama/llama-models, models/llama4/tokenizer.py, `Tokenizer.O200K_PATTERN`). The same
# string is `O200K_PATTERN` in transformers' models/llama4/convert_llama4_weights_to_hf.py,
# which wrote the released tokenizer.json, and it is tiktoken's o200k_base `pat_str`
# (tiktoken_ext/openai_public.py, the seven alternatives joined by "|").
LLAMA4_PAT_STR = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

LLAMA4_NUM_SPECIAL_TOKENS = 2048
"""Special slots after the BPE ranks: 200000 ranks + 2048 = Llama 4's 202048 ids."""

# Where each named special sits, counted from the first id after the ranks (200000 in the
# release). Offsets follow Meta's list (see `_llama4_special_token_strings`): bos 200000,
# eos 200001, <|eot|> 200008, pad 200018, <|image_start|> 200080, <|image_end|> 200081,
# <|tile_x_separator|> 200084, <|tile_y_separator|> 200085, <|image|> 200090, <|patch|> 200092.
# Llama 4 names no frame separator (its processor has no video); we take offset 82, the
# first reserved slot of the vision block (`<|vision_reserved_special_token_0|>` in the
# release, between <|image_end|> and <|tile_x_separator|>), and call it `<|frame_separator|>`.
LLAMA4_SPECIAL_OFFSETS: dict[str, int] = {
    "bos": 0,
    "eos": 1,
    "pad": 18,
    "eot": 8,
    "image_start": 80,
    "image_end": 81,
    "image": 90,
    "patch": 92,
    "tile_x_separator": 84,
    "tile_y_separator": 85,
    "frame_separator": 82,
}

FRAME_SEPARATOR_SLOT_NAME = "<|vision_reserved_special_token_0|>"
"""The release's name for the slot we use as `<|frame_separator|>` (offset 82)."""

# The names `HFTokenizer` looks up, first match wins. The release names pad
# `<|finetune_right_pad|>` (id 200018); `<|finetune_right_pad_id|>` is Llama 3's name (and the
# byte tokenizer's string for pad). A tokenizer.json without `<|frame_separator|>` uses the
# release's name of the slot we assign to it, so both adapters agree on the release.
LLAMA4_SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("<|begin_of_text|>",),
    "eos": ("<|end_of_text|>",),
    "pad": ("<|finetune_right_pad|>", "<|finetune_right_pad_id|>"),
    "eot": ("<|eot|>",),
    "image_start": ("<|image_start|>",),
    "image_end": ("<|image_end|>",),
    "image": ("<|image|>",),
    "patch": ("<|patch|>",),
    "tile_x_separator": ("<|tile_x_separator|>",),
    "tile_y_separator": ("<|tile_y_separator|>",),
    "frame_separator": ("<|frame_separator|>", FRAME_SEPARATOR_SLOT_NAME),
}


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def _llama4_special_token_strings() -> tuple[str, ...]:
    """The 2048 special strings in slot order: Meta's list (llama-models,
    models/llama4/tokenizer.py: BASIC_SPECIAL_TOKENS + LLAMA4_TEXT_POST_TRAIN_SPECIAL_TOKENS +
    LLAMA4_VISION_SPECIAL_TOKENS + LLAMA4_REASONING_SPECIAL_TOKENS, then
    `<|reserved_special_token_N|>` up to 2048), with slot 82 renamed `<|frame_separator|>`."""
    basic = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
    ]
    text = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_reserved("text_post_train", 6),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_reserved("text_post_train", 61, 8),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        "<|frame_separator|>",  # the release's <|vision_reserved_special_token_0|>
        "<|vision_reserved_special_token_1|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_reserved("vision", 4, 2),
        "<|image|>",
        "<|vision_reserved_special_token_6|>",
        "<|patch|>",
        *_reserved("vision", 1041, 7),
    ]
    reasoning = [
        *_reserved("reasoning", 8),
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]
    named = basic + text + vision + reasoning
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(LLAMA4_NUM_SPECIAL_TOKENS)]
    return tuple(named + reserved[: LLAMA4_NUM_SPECIAL_TOKENS - len(named)])


LLAMA4_SPECIAL_TOKEN_STRINGS: tuple[str, ...] = _llama4_special_token_strings()
"""Slot i holds id `num_ranks + i` in `TiktokenTokenizer`."""


def llama4_special_tokens(base: int) -> SpecialTokens:
    """The named special ids when the special block starts at `base` (= the number of ranks)."""
    return SpecialTokens(**{name: base + offset for name, offset in LLAMA4_SPECIAL_OFFSETS.items()})


# ---------------------------------------------------------------------------------------------
# tiktoken
# ---------------------------------------------------------------------------------------------

# Meta's reference tokenizer encodes at most 400,000 characters per tiktoken call and cuts
# runs of more than 25,000 consecutive whitespace or non-whitespace characters (tiktoken
# issue 195: the regex engine panics or goes quadratic on such runs). We cut at the same
# places, so ids match the reference exactly, also for pathological documents.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file (`<base64 token> <rank>` per line, the
    `tokenizer.model` of Llama 3/4), read through fsspec. Ranks must be 0..N-1, each once, and
    every single byte must be a token (else some text could not be encoded)."""
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:80]!r}"
            ) from None
        if token in ranks:
            raise ValueError(f"{path}:{line_no}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each exactly once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        shown = ", ".join(f"0x{b:02X}" for b in missing[:8]) + (", ..." if missing[8:] else "")
        raise ValueError(f"{path}: {len(missing)} single bytes have no rank ({shown})")
    return ranks


class TiktokenTokenizer:
    """A tiktoken BPE ranks file with Llama 4's pattern and special-token layout: the specials
    take the 2048 ids after the last rank, with the named ones at their Llama 4 offsets."""

    def __init__(self, ranks_path: str) -> None:
        tiktoken = _require("tiktoken", "TiktokenTokenizer")
        ranks = load_tiktoken_ranks(ranks_path)
        base = len(ranks)
        self.path = ranks_path
        self.special = llama4_special_tokens(base)
        self._special_str = {base + i: s for i, s in enumerate(LLAMA4_SPECIAL_TOKEN_STRINGS)}
        self._encoding = tiktoken.Encoding(
            name=ranks_path,
            pat_str=LLAMA4_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={s: i for i, s in self._special_str.items()},
        )

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """BPE ids of `text`. Special-token strings in `text` are plain text
        (`disallowed_special=()` with nothing allowed): add specials with `bos`/`eos` or by id."""
        ids = [self.special.bos] if bos else []
        for piece in split_like_reference(text):
            ids.extend(self._encoding.encode(piece, disallowed_special=()))
        if eos:
            ids.append(self.special.eos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids render as their string. Bytes are joined across ids before
        decoding, so only truly invalid UTF-8 becomes U+FFFD."""
        ids = list(ids)
        try:
            return self._encoding.decode(ids)
        except (KeyError, OverflowError):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(self._outside(bad)) from None

    def token_str(self, token_id: int) -> str:
        """The special string, or the token's text with bytes that are not printable on their
        own (control characters, parts of a multi-byte character) written `<0xNN>`."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(self._outside(token_id))
        special = self._special_str.get(token_id)
        if special is not None:
            return special
        return _readable_bytes(self._encoding.decode_single_token_bytes(token_id))

    def _outside(self, token_id: int) -> str:
        return f"token id {token_id} is outside {self!r}'s vocabulary [0, {self.vocab_size})"


def split_like_reference(
    text: str,
    max_chars: int = TIKTOKEN_MAX_ENCODE_CHARS,
    max_run: int = MAX_NO_WHITESPACES_CHARS,
) -> Iterator[str]:
    """`text` in the pieces Meta's reference tokenizer hands to tiktoken: slices of `max_chars`
    characters, each cut so that no piece holds more than `max_run` consecutive whitespace
    (or non-whitespace) characters; a long run is cut every `max_run` characters from its
    start. Same cuts as llama-models' `_split_whitespaces_or_nonwhitespaces`, found with a
    linear regex instead of a per-character Python loop."""
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        if len(chunk) <= max_run:
            yield chunk
            continue
        cuts = [
            cut
            for run in _long_runs(max_run).finditer(chunk)
            for cut in range(run.start() + max_run, run.end(), max_run)
        ]
        previous = 0
        for cut in cuts:
            yield chunk[previous:cut]
            previous = cut
        yield chunk[previous:]


@functools.lru_cache(maxsize=8)
def _long_runs(max_run: int) -> re.Pattern[str]:
    # The lookbehinds anchor a match at the start of a run, so the search stays linear; Python's
    # \s on str is exactly str.isspace(), the reference's test.
    n = max_run + 1
    return re.compile(rf"(?<!\S)\S{{{n},}}|(?<!\s)\s{{{n},}}")


# ---------------------------------------------------------------------------------------------
# HF tokenizer.json
# ---------------------------------------------------------------------------------------------


class HFTokenizer:
    """An HF `tokenizer.json` run by the `tokenizers` package. The named specials are found by
    their Llama 4 names (`LLAMA4_SPECIAL_NAMES`). Encoding never adds the file's own specials
    (no post-processor template) and never matches added tokens in text."""

    def __init__(self, tokenizer_json_path: str) -> None:
        tokenizers = _require("tokenizers", "HFTokenizer")
        path = tokenizer_json_path
        self.path = path
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
        try:
            config = json.loads(text)
            self._tokenizer = tokenizers.Tokenizer.from_str(text)
            # A twin without added tokens encodes: the added-token matcher would turn
            # "<|eot|>" in a document into the special id.
            plain = dict(config, added_tokens=[])
            self._encoder = tokenizers.Tokenizer.from_str(json.dumps(plain))
        except Exception as error:  # json, tokenizers (Rust) or shape errors
            raise ValueError(f"{path}: not a loadable tokenizer.json: {error}") from error
        self._added = {int(t["id"]): str(t["content"]) for t in config.get("added_tokens", [])}
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self._byte_level = _has_byte_level_decoder(config.get("decoder"))
        self.special = SpecialTokens(
            **{name: self._find(name, names) for name, names in LLAMA4_SPECIAL_NAMES.items()}
        )
        self._check_specials()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """BPE ids of `text`, without the file's own specials; special-token strings in `text`
        are plain text. Add specials with `bos`/`eos` or by id."""
        ids = [self.special.bos] if bos else []
        ids.extend(self._encoder.encode(text, add_special_tokens=False).ids)
        if eos:
            ids.append(self.special.eos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids render as their string."""
        ids = list(ids)
        for token_id in ids:
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(self._outside(token_id))
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        """The added token's string, or the token's text (for a byte-level BPE, its bytes with
        the ones not printable on their own written `<0xNN>`), else the vocabulary entry."""
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(self._outside(token_id))
        added = self._added.get(token_id)
        if added is not None:
            return added
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{self!r} has no token with id {token_id}")
        table = _byte_level_decode_table()
        if self._byte_level and all(char in table for char in token):
            return _readable_bytes(bytes(table[char] for char in token))
        return token

    def _find(self, field: str, names: tuple[str, ...]) -> int:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        wanted = " or ".join(repr(name) for name in names)
        raise ValueError(f"{self.path}: the tokenizer has no {wanted} token (the {field} token)")

    def _check_specials(self) -> None:
        ids = dataclasses.asdict(self.special)
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"{self.path}: special tokens share ids: {ids}")
        # A special that is also a reachable vocabulary entry would let text inject it.
        for name, token_id in ids.items():
            for string in LLAMA4_SPECIAL_NAMES[name]:
                if token_id in self._encoder.encode(string, add_special_tokens=False).ids:
                    raise ValueError(
                        f"{self.path}: plain text {string!r} encodes to the {name} id {token_id}"
                    )

    def _outside(self, token_id: int) -> str:
        return f"token id {token_id} is outside {self!r}'s vocabulary [0, {self._vocab_size})"


def _has_byte_level_decoder(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level_decoder(d) for d in decoder.get("decoders") or ())


@functools.lru_cache(maxsize=1)
def _byte_level_decode_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for
    themselves, the other bytes for U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table
