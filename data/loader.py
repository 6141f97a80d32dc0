"""A deterministic, resumable batch stream whose global order does not depend on the world size.

Every rank runs the same packer over the same seeded document order, so all ranks see the same
global stream of rows; rank r of W keeps rows [r * G / W, (r + 1) * G / W) of each global batch of
G rows. The state is the packer's position, identical on every rank, so a checkpoint taken with
one number of ranks resumes the same global stream with another.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.packing import PackedRows, SequencePacker
from data.shards import Document, expand_sources, iter_documents
from data.tokenizer import Tokenizer


def load_documents(sources: list[str]) -> list[Document]:
    """Every document of every source, in source order (sources are expanded and sorted)."""
    documents = [doc for path in expand_sources(sources) for doc in iter_documents(path)]
    if not documents:
        raise ValueError(f"no documents found in data.sources = {sources}")
    return documents


@dataclass(frozen=True)
class RankSlice:
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")

    def rows(self, global_rows: int) -> slice:
        if global_rows % self.world_size:
            raise ValueError(
                f"global batch of {global_rows} rows does not split over {self.world_size} ranks"
            )
        per_rank = global_rows // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


class GlobalBatchLoader:
    """Yields this rank's share of each global batch of packed, document-masked rows."""

    def __init__(
        self,
        documents: list[Document],
        tokenizer: Tokenizer,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        shard: RankSlice,
    ):
        self.documents = documents
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.shard = shard
        self.rows = shard.rows(global_batch_size)
        self.packer = SequencePacker(len(documents), self._tokenize, seq_len, seed)
        self.batches_served = 0

    def _tokenize(self, index: int) -> list[int]:
        return self.tokenizer.encode(self.documents[index].text, bos=True, eos=True)

    def next_batch(self) -> PackedRows:
        self.batches_served += 1
        return self.packer.next_rows(self.global_batch_size).select(self.rows)

    def state_dict(self) -> dict[str, int]:
        return {**self.packer.state_dict(), "batches_served": self.batches_served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.packer.load_state_dict(state)
        self.batches_served = int(state["batches_served"])
