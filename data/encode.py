"""Documents -> token sequences with their media blocks, ready for the packer.

A document becomes `<bos> parts... <eos>`: text parts through the tokenizer, image and video
parts as Llama 4 image blocks (see data/media.py). Each `<|image_start|> ... <|image_end|>` span
is one unsplittable block whose tiles travel with it; a video contributes one block per sampled
frame, so a long video can continue on the next row between frames.
"""

from __future__ import annotations

import numpy as np

from data.languages import LANGUAGES
from data.media import MediaConfig, MediaError, media_block
from data.packing import EncodedDocument
from data.pretokenized import TokenizedDocument
from data.shards import Document
from data.sources import BadDocument
from data.tokenizer import SpecialTokens, Tokenizer


def encode_document(
    document: Document | TokenizedDocument, tokenizer: Tokenizer, media: MediaConfig
) -> EncodedDocument:
    name = f"{document.source}:{document.line}"
    if document.lang not in LANGUAGES:
        raise BadDocument(name, "unknown_language", f"{document.lang!r} is not a FLORES-200 code")
    if isinstance(document, TokenizedDocument):
        if len(document.tokens) <= 2:
            raise BadDocument(name, "empty_document", "no tokens between bos and eos")
        return EncodedDocument(document.tokens, document.lang, name=name)
    special = tokenizer.special
    tokens = [special.bos]
    tiles: list[np.ndarray] = []
    for part in document.content or ({"type": "text", "text": document.text},):
        if part["type"] == "text":
            tokens += tokenizer.encode(part["text"])
            continue
        try:
            block = media_block(part, special, media)
        except MediaError as error:
            raise BadDocument(name, f"bad_{part['type']}", str(error)) from None
        tokens += block.tokens
        tiles.append(block.tiles)
    if len(tokens) == 1:
        raise BadDocument(name, "empty_document", "no text and no media")
    tokens.append(special.eos)
    token_array = np.asarray(tokens, dtype=np.int64)
    blocks = image_spans(token_array, special)
    media_tiles = split_tiles(token_array, blocks, tiles, special.patch, media.tokens_per_tile)
    return EncodedDocument(token_array, document.lang, blocks, media_tiles, name)


def image_spans(tokens: np.ndarray, special: SpecialTokens) -> tuple[tuple[int, int], ...]:
    """[start, end) of every `<|image_start|> ... <|image_end|>` span, in order."""
    starts = np.flatnonzero(tokens == special.image_start)
    ends = np.flatnonzero(tokens == special.image_end) + 1
    if len(starts) != len(ends) or np.any(starts >= ends):
        raise ValueError("unbalanced image start/end tokens")
    return tuple(zip(starts.tolist(), ends.tolist(), strict=True))


def split_tiles(
    tokens: np.ndarray,
    blocks: tuple[tuple[int, int], ...],
    tiles: list[np.ndarray],
    patch_id: int,
    tokens_per_tile: int,
) -> tuple[np.ndarray, ...]:
    """Each block's tiles: as many as its patch tokens fill, taken in order."""
    if not blocks:
        return ()
    all_tiles = np.concatenate(tiles)
    per_block = [int((tokens[s:e] == patch_id).sum()) // tokens_per_tile for s, e in blocks]
    if sum(per_block) != len(all_tiles):
        raise ValueError(f"{sum(per_block)} tiles in the tokens but {len(all_tiles)} decoded")
    bounds = np.cumsum([0, *per_block])
    return tuple(all_tiles[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
