"""Tokenizers: text <-> token ids, plus the special tokens early fusion needs.

The default `ByteTokenizer` needs no vocabulary file and is lossless for every script: ids
0..255 are the UTF-8 bytes of the text, special tokens follow from 256. It is what the tiny
CPU runs and the tests use. The BPE adapters of data/bpe_tokenizers.py share its interface:
`TiktokenTokenizer` reads a tiktoken ranks file (Llama 4's `tokenizer.model`) and lays out the
Llama 4 special tokens after the ranks; `HFTokenizer` reads an HF `tokenizer.json` and finds
the same specials by name. Pick one with `build_tokenizer("byte" | "tiktoken:PATH" | "hf:PATH")`.

Every tokenizer treats special-token strings inside text as plain text: document text can
never inject a control token; specials enter the stream only by id (`bos`/`eos`, the packer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

NUM_BYTES = 256


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. The Llama 4 names are kept so BPE adapters map 1:1."""

    bos: int
    eos: int
    pad: int
    eot: int
    image_start: int
    image_end: int
    image: int
    patch: int
    tile_x_separator: int
    tile_y_separator: int
    frame_separator: int


# The order fixes the byte tokenizer's ids (bos = 256, eos = 257, ...): changing it changes
# every tokenized dataset and checkpoint embedding, so append, never reorder.
SPECIAL_TOKEN_STRINGS: dict[str, str] = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|finetune_right_pad_id|>",
    "eot": "<|eot|>",
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x_separator": "<|tile_x_separator|>",
    "tile_y_separator": "<|tile_y_separator|>",
    "frame_separator": "<|frame_separator|>",
}


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    special: SpecialTokens

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_str(self, token_id: int) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens in `SPECIAL_TOKEN_STRINGS` order."""

    def __init__(self) -> None:
        ids = {name: NUM_BYTES + i for i, name in enumerate(SPECIAL_TOKEN_STRINGS)}
        self.special = SpecialTokens(**ids)
        self._special_str = {ids[name]: s for name, s in SPECIAL_TOKEN_STRINGS.items()}

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + len(self._special_str)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """The UTF-8 bytes of `text`. Special-token strings in `text` stay plain bytes, so
        document text can never inject control tokens; add them with `bos`/`eos` or by id."""
        ids = [self.special.bos] if bos else []
        ids.extend(text.encode("utf-8"))
        if eos:
            ids.append(self.special.eos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids render as their string. Bytes are gathered across ids
        and decoded per run, so a character split over several ids comes back whole; only
        truly invalid UTF-8 becomes U+FFFD."""
        parts: list[str] = []
        pending = bytearray()
        for token_id in ids:
            if 0 <= token_id < NUM_BYTES:
                pending.append(token_id)
                continue
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            parts.append(self._special(token_id))
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_str(self, token_id: int) -> str:
        """A readable form of one id: the special string, the ASCII character, or `<0xNN>`
        for a byte that is not printable ASCII on its own (part of a multi-byte character)."""
        if 0 <= token_id < NUM_BYTES:
            char = chr(token_id)
            return char if char.isascii() and char.isprintable() else f"<0x{token_id:02X}>"
        return self._special(token_id)

    def _special(self, token_id: int) -> str:
        try:
            return self._special_str[token_id]
        except KeyError:
            raise ValueError(
                f"token id {token_id} is outside the byte tokenizer's vocabulary "
                f"[0, {self.vocab_size})"
            ) from None


# ---------------------------------------------------------------------------------------------
# Shared helpers and the factory
# ---------------------------------------------------------------------------------------------


def _readable_bytes(raw: bytes) -> str:
    """`raw` as text, with each byte of a non-printable character or of invalid UTF-8 written
    `<0xNN>` (the byte tokenizer's `token_str` convention)."""
    parts: list[str] = []
    while raw:
        try:
            text, bad, raw = raw.decode("utf-8"), b"", b""
        except UnicodeDecodeError as error:
            text = raw[: error.start].decode("utf-8")
            bad, raw = raw[error.start : error.end], raw[error.end :]
        for char in text:
            parts.append(char if char.isprintable() else _hex_bytes(char.encode("utf-8")))
        parts.append(_hex_bytes(bad))
    return "".join(parts)


def _hex_bytes(raw: bytes) -> str:
    return "".join(f"<0x{b:02X}>" for b in raw)


def _require(module: str, user: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{user} needs the {module!r} package: pip install {module}") from error


_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"byte": ByteTokenizer}
_FILE_TOKENIZERS = ("tiktoken", "hf")
_VALID_SPECS = (
    "'byte' (UTF-8 bytes, no vocabulary file), 'tiktoken:PATH' (a tiktoken BPE ranks file such "
    "as Llama 4's tokenizer.model, with the Llama 4 special-token layout) or 'hf:PATH' (an HF "
    "tokenizer.json); PATH is a local path or an fsspec URL"
)


def build_tokenizer(name_or_spec: str) -> Tokenizer:
    """The tokenizer named by `name_or_spec` (config key `data.tokenizer`): "byte",
    "tiktoken:PATH" or "hf:PATH"."""
    kind, colon, path = name_or_spec.partition(":")
    if not colon and kind in _TOKENIZERS:
        return _TOKENIZERS[kind]()
    if colon and kind in _FILE_TOKENIZERS:
        if not path:
            raise ValueError(
                f"tokenizer spec {name_or_spec!r} names no file; valid forms: {_VALID_SPECS}"
            )
        from data.bpe_tokenizers import HFTokenizer, TiktokenTokenizer  # only when named

        return {"tiktoken": TiktokenTokenizer, "hf": HFTokenizer}[kind](path)
    raise ValueError(f"unknown tokenizer {name_or_spec!r}; valid forms: {_VALID_SPECS}")
