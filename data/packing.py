"""Pack encoded documents into fixed-length rows for document-masked, early-fusion training.

Documents are laid end to end and every row is filled to exactly `seq_len` tokens. Text may be
cut anywhere: a document that does not fit continues at the start of the next row. An image (or
video-frame) block is never cut: when it does not fit in what is left of a row, the row is
padded and the block starts the next one; a document with a block longer than a whole row is
skipped and counted (or raises, as the caller chooses). A document to keep whole (a passkey
document, or with `whole_long_documents` = N any document of N tokens or more) that fits in a
row but not in what is left of the current one is not cut either: the row is padded and the
document opens the next row (long-context stages train on whole long documents). Every row
carries, per token:
  - `document_ids`: 0, 1, 2, ... for each document piece in the row, padding a piece of its own
    (attention never crosses pieces);
  - `positions`: the offset inside the piece, restarting at 0 for each piece, so a continuation
    is, for the model, a document of its own (rows stay self-contained);
  - `labels`: the next token when it belongs to the same piece, else IGNORE_INDEX; padding and
    `<|patch|>` targets (image features are inputs, never predictions) are IGNORE_INDEX too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedDocument:
    """A document as tokens, with the spans that must stay whole and what fills them."""

    tokens: np.ndarray
    """int64 (n,): bos, text and media-block tokens, eos."""
    lang: str = ""
    blocks: tuple[tuple[int, int], ...] = ()
    """[start, end) of each image / video-frame block, in order, non-overlapping."""
    media: tuple[Any, ...] = ()
    """One payload per block: whatever the loader needs to produce that block's pixels."""
    name: str = ""
    """Where it came from (file:line), for error messages."""
    keep_whole: bool = False
    """Never cut this document when it fits in a row (see RowPacker)."""

    def block_starting_at(self, offset: int) -> int | None:
        for index, (start, _) in enumerate(self.blocks):
            if start == offset:
                return index
        return None

    def next_block_start(self, offset: int) -> int:
        starts = [start for start, _ in self.blocks if start > offset]
        return min(starts, default=len(self.tokens))


class DocumentSource(Protocol):
    """A deterministic, resumable stream of encoded documents."""

    def next_document(self) -> EncodedDocument: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class PackedRow:
    tokens: np.ndarray
    document_ids: np.ndarray
    positions: np.ndarray
    media: list[Any]
    """The payloads of the blocks in this row, in token order."""
    token_counts: dict[tuple[str, str], int]
    """Non-pad tokens by (language, modality), modality "text" or "image"."""


@dataclass
class PackingStats:
    tokens: int = 0
    padding: int = 0
    oversized_documents: int = 0
    by_language_modality: dict[str, int] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        """Share of non-pad tokens among all tokens packed so far."""
        total = self.tokens + self.padding
        return self.tokens / total if total else 1.0


class OversizedBlockError(ValueError):
    pass


class RowPacker:
    """Fills rows of `seq_len` from a document source; resumable at any row boundary."""

    def __init__(
        self,
        source: DocumentSource,
        seq_len: int,
        pad_id: int,
        patch_id: int,
        skip_oversized: bool = False,
        whole_long_documents: int = 0,
    ):
        self.source = source
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.patch_id = patch_id
        self.skip_oversized = skip_oversized
        self.whole_long_documents = whole_long_documents
        """Documents of at least this many tokens are kept whole when they fit; 0: none."""
        self.stats = PackingStats()
        self._document: EncodedDocument | None = None
        self._fetched = 0
        """Documents fetched so far: a new count is a new piece, even for an equal document."""
        self._document_state = source.state_dict()
        """The source's state just before the current document, to fetch it again on resume."""
        self._offset = 0

    def _current(self) -> EncodedDocument:
        while self._document is None:
            self._document_state = self.source.state_dict()
            document = self.source.next_document()
            if not document.tokens.size:
                raise ValueError(f"{document.name or 'a document'}: encoded to no tokens")
            longest = max((end - start for start, end in document.blocks), default=0)
            if longest <= self.seq_len:
                self._document = document
                self._fetched += 1
            elif self.skip_oversized:
                self.stats.oversized_documents += 1
            else:
                raise OversizedBlockError(
                    f"{document.name}: a media block of {longest} tokens does not fit in a row "
                    f"of training.seq_len = {self.seq_len}"
                )
        return self._document

    def _opens_next_row(self, document: EncodedDocument, room: int) -> bool:
        """Whether `document` is one to keep whole that fits in a row but not in the `room` left
        of this one (then it waits for the next row)."""
        n = len(document.tokens)
        if self._offset or n <= room or n > self.seq_len:
            return False
        return document.keep_whole or 0 < self.whole_long_documents <= n

    def _unit_length(self, document: EncodedDocument, room: int) -> int:
        """Tokens to take next: a whole block, or text up to the next block / the row end."""
        block = document.block_starting_at(self._offset)
        if block is not None:
            start, end = document.blocks[block]
            return end - start if end - start <= room else 0
        return min(document.next_block_start(self._offset) - self._offset, room)

    def next_row(self) -> PackedRow:
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        document_ids = np.empty(self.seq_len, dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        media: list[Any] = []
        counts: dict[tuple[str, str], int] = {}
        filled, piece, piece_start = 0, -1, 0
        piece_document = -1
        while filled < self.seq_len:
            document = self._current()
            if filled and self._opens_next_row(document, self.seq_len - filled):
                break
            take = self._unit_length(document, self.seq_len - filled)
            if take == 0:  # a block that does not fit: pad, it opens the next row
                break
            if self._fetched != piece_document:
                piece, piece_start, piece_document = piece + 1, filled, self._fetched
            block = document.block_starting_at(self._offset)
            if block is not None:
                media.append(document.media[block])
            span = slice(filled, filled + take)
            tokens[span] = document.tokens[self._offset : self._offset + take]
            document_ids[span] = piece
            positions[span] = np.arange(filled - piece_start, filled - piece_start + take)
            key = (document.lang, "text" if block is None else "image")
            counts[key] = counts.get(key, 0) + take
            filled += take
            self._offset += take
            if self._offset == len(document.tokens):
                self._document, self._offset = None, 0
        padding = self.seq_len - filled
        document_ids[filled:] = piece + 1
        positions[filled:] = np.arange(padding)
        self._account(counts, padding)
        return PackedRow(tokens, document_ids, positions, media, counts)

    def _account(self, counts: dict[tuple[str, str], int], padding: int) -> None:
        self.stats.tokens += sum(counts.values())
        self.stats.padding += padding
        for (lang, modality), n in counts.items():
            key = f"{lang}/{modality}"
            self.stats.by_language_modality[key] = self.stats.by_language_modality.get(key, 0) + n

    def labels(self, rows: np.ndarray, document_ids: np.ndarray) -> np.ndarray:
        """labels[t] = tokens[t + 1] in one piece, unless that is a patch or padding."""
        labels = np.full_like(rows, IGNORE_INDEX)
        same_piece = document_ids[:, 1:] == document_ids[:, :-1]
        predictable = (rows[:, 1:] != self.patch_id) & (rows[:, 1:] != self.pad_id)
        labels[:, :-1] = np.where(same_piece & predictable, rows[:, 1:], IGNORE_INDEX)
        return labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "document_state": self._document_state if self._document is not None else None,
            "next_state": None if self._document is not None else self.source.state_dict(),
            "offset": self._offset,
            "stats": {
                "tokens": self.stats.tokens,
                "padding": self.stats.padding,
                "oversized_documents": self.stats.oversized_documents,
                "by_language_modality": dict(self.stats.by_language_modality),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stats = state["stats"]
        self.stats = PackingStats(
            stats["tokens"],
            stats["padding"],
            stats["oversized_documents"],
            dict(stats["by_language_modality"]),
        )
        self._document, self._offset = None, 0
        if state["document_state"] is None:
            self.source.load_state_dict(state["next_state"])
            return
        self.source.load_state_dict(state["document_state"])
        self._current()
        self._offset = int(state["offset"])


def stack_rows(rows: Sequence[PackedRow], packer: RowPacker) -> dict[str, np.ndarray]:
    tokens = np.stack([row.tokens for row in rows])
    document_ids = np.stack([row.document_ids for row in rows])
    return {
        "tokens": tokens,
        "document_ids": document_ids,
        "positions": np.stack([row.positions for row in rows]),
        "labels": packer.labels(tokens, document_ids),
    }
