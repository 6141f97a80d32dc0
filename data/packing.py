"""Pack tokenized documents into fixed-length rows for document-masked training.

Greedy concatenate-and-split: documents are laid end to end, each row is filled to exactly
`seq_len` tokens, and a document that does not fit continues at the start of the next row. No
token is padded, dropped or repeated. Every row carries, per token:
  - `document_ids`: 0, 1, 2, ... for each document piece in the row (attention never crosses them);
  - `positions`: the offset inside that piece, restarting at 0 for each piece, so a continuation
    is, for the model, a document of its own (rows stay self-contained);
  - `labels`: the next token when it belongs to the same piece, else IGNORE_INDEX, so no token is
    trained to predict the start of an unrelated document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedRows:
    """A batch of packed rows, each field an int64 array of shape (rows, seq_len)."""

    tokens: np.ndarray
    document_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice) -> PackedRows:
        return PackedRows(
            self.tokens[rows], self.document_ids[rows], self.positions[rows], self.labels[rows]
        )


@dataclass
class PackerState:
    """Where the packer stands in the document order: all it needs to continue exactly."""

    epoch: int = 0
    cursor: int = 0
    """Index into this epoch's document order of the document being packed."""
    offset: int = 0
    """Tokens of that document already emitted."""


class SequencePacker:
    """Packs documents visited in a seeded, per-epoch shuffled order into rows of `seq_len`."""

    def __init__(
        self,
        num_documents: int,
        tokenize: Callable[[int], Sequence[int]],
        seq_len: int,
        seed: int,
    ):
        if num_documents <= 0:
            raise ValueError("the packer needs at least one document")
        self.num_documents = num_documents
        self.tokenize = tokenize
        self.seq_len = seq_len
        self.seed = seed
        self.state = PackerState()
        self._order = self._epoch_order(0)
        self._current: tuple[int, Sequence[int]] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)

    def _document_tokens(self) -> Sequence[int]:
        index = int(self._order[self.state.cursor])
        if self._current is None or self._current[0] != index:
            tokens = self.tokenize(index)
            if not tokens:
                raise ValueError(f"document {index} tokenized to nothing")
            self._current = (index, tokens)
        return self._current[1]

    def _advance_document(self) -> None:
        self.state.offset = 0
        self.state.cursor += 1
        if self.state.cursor == self.num_documents:
            self.state.epoch += 1
            self.state.cursor = 0
            self._order = self._epoch_order(self.state.epoch)

    def next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = np.empty(self.seq_len, dtype=np.int64)
        document_ids = np.empty(self.seq_len, dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        filled, piece = 0, 0
        while filled < self.seq_len:
            doc = self._document_tokens()
            take = min(len(doc) - self.state.offset, self.seq_len - filled)
            tokens[filled : filled + take] = doc[self.state.offset : self.state.offset + take]
            document_ids[filled : filled + take] = piece
            positions[filled : filled + take] = np.arange(take)
            filled += take
            piece += 1
            self.state.offset += take
            if self.state.offset == len(doc):
                self._advance_document()
        return tokens, document_ids, positions

    def next_rows(self, n_rows: int) -> PackedRows:
        rows = [self.next_row() for _ in range(n_rows)]
        tokens, document_ids, positions = (np.stack(parts) for parts in zip(*rows, strict=True))
        return PackedRows(tokens, document_ids, positions, next_token_labels(tokens, document_ids))

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.state.epoch,
            "cursor": self.state.cursor,
            "offset": self.state.offset,
            "num_documents": self.num_documents,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_documents", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]}, but this run has "
                    f"{key}={getattr(self, key)}: the data or seed changed, so the stream cannot "
                    "be resumed exactly"
                )
        self.state = PackerState(int(state["epoch"]), int(state["cursor"]), int(state["offset"]))
        self._order = self._epoch_order(self.state.epoch)
        self._current = None


def next_token_labels(tokens: np.ndarray, document_ids: np.ndarray) -> np.ndarray:
    """labels[t] = tokens[t + 1] in one document piece, else (and at the end) IGNORE_INDEX."""
    labels = np.full_like(tokens, IGNORE_INDEX)
    same_piece = document_ids[:, 1:] == document_ids[:, :-1]
    labels[:, :-1] = np.where(same_piece, tokens[:, 1:], IGNORE_INDEX)
    return labels
