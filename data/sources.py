"""Deterministic, resumable streams of encoded documents.

`ShuffledSource` visits one list of documents in a seeded order, reshuffled every epoch.
`MixtureSource` interleaves one `ShuffledSource` per language so that the token share of each
language follows the mixture weights. Both are pure functions of the seed, the documents and
their own small state, which is what makes the packed stream identical for every world size.

Bad documents: `encode` raises `BadDocument`; with `skip_bad=True` the document is counted by
reason (the counts are part of the state, so a resume keeps them) and the stream moves on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from data.mixture import MixtureSampler
from data.packing import EncodedDocument


class ExhaustedStream(ValueError):
    """Every document of a stream was bad: nothing left to serve from it."""


class BadDocument(ValueError):
    """A document that cannot be encoded; `reason` is a short key for counting skips."""

    def __init__(self, name: str, reason: str, detail: str):
        super().__init__(f"{name}: {reason}: {detail}")
        self.reason = reason


class ShuffledSource:
    """Documents 0..n-1, each epoch in a fresh permutation seeded by (seed, stream, epoch)."""

    def __init__(
        self,
        n_documents: int,
        encode: Callable[[int], EncodedDocument],
        seed: int,
        stream: int = 0,
        skip_bad: bool = False,
        skipped: dict[str, int] | None = None,
    ):
        if n_documents <= 0:
            raise ValueError("a document source needs at least one document")
        self.n_documents = n_documents
        self.encode = encode
        self.seed, self.stream = seed, stream
        self.skip_bad = skip_bad
        self.skipped = skipped if skipped is not None else {}
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n_documents)

    def next_document(self) -> EncodedDocument:
        # Up to two epochs of draws from the cursor visit every document at least once.
        for _ in range(2 * self.n_documents):
            index = int(self._order[self.cursor])
            self._advance()
            try:
                return self.encode(index)
            except BadDocument as error:
                if not self.skip_bad:
                    raise
                self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        raise ExhaustedStream(
            f"every document of stream {self.stream} is bad (skips so far: {self.skipped}): "
            "fix or remove its shards"
        )

    def _advance(self) -> None:
        self.cursor += 1
        if self.cursor == self.n_documents:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_documents": self.n_documents}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n_documents"]) != self.n_documents:
            raise ValueError(
                f"data state was saved with n_documents={state['n_documents']} in stream "
                f"{self.stream}, this run has {self.n_documents}: the data changed, so the "
                "stream cannot be resumed exactly"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


class MixtureSource:
    """One shuffled stream per language, drawn so token shares converge to `weights`."""

    def __init__(
        self,
        documents_by_language: Mapping[str, int],
        encode: Callable[[str, int], EncodedDocument],
        weights: Mapping[str, float],
        seed: int,
        skip_bad: bool = False,
    ):
        unknown = sorted(set(weights) - set(documents_by_language))
        if unknown:
            raise ValueError(f"mixture weights for languages without documents: {unknown[:5]}")
        self.skipped: dict[str, int] = {}
        self.weights = dict(weights)
        self.skip_bad = skip_bad
        self.dropped: list[str] = []
        """Languages left out since all their documents proved bad (with skip_bad only)."""
        self.sampler = MixtureSampler(weights)
        self.streams = {
            lang: ShuffledSource(
                count,
                lambda index, lang=lang: encode(lang, index),
                seed,
                stream=i,
                skip_bad=skip_bad,
                skipped=self.skipped,
            )
            for i, (lang, count) in enumerate(sorted(documents_by_language.items()))
            if weights.get(lang, 0.0) > 0
        }

    def next_document(self) -> EncodedDocument:
        while True:
            lang = self.sampler.next_language()
            try:
                document = self.streams[lang].next_document()
            except ExhaustedStream:
                if not self.skip_bad:
                    raise
                self._drop(lang)
                continue
            self.sampler.record(lang, len(document.tokens))
            return document

    def _drop(self, lang: str) -> None:
        """Serve the other languages, in their relative weights, from here on."""
        self.dropped.append(lang)
        self.skipped["language_without_usable_documents"] = len(self.dropped)
        self.sampler = self._sampler_state(self.sampler.state_dict())

    def _sampler_state(self, state: Mapping[str, Any]) -> MixtureSampler:
        weights = {k: 0.0 if k in self.dropped else w for k, w in self.weights.items()}
        if not any(weights.values()):
            raise ExhaustedStream("every language of the mixture has only bad documents")
        sampler = MixtureSampler(weights)
        sampler.load_state_dict(state)
        return sampler

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "streams": {lang: s.state_dict() for lang, s in self.streams.items()},
            "skipped": dict(self.skipped),
            "dropped": list(self.dropped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.streams) - set(state["streams"]))
        if missing:
            raise ValueError(f"data state has no stream for languages {missing[:5]}")
        self.dropped = list(state["dropped"])
        self.sampler = self._sampler_state(state["sampler"])
        for lang, stream in self.streams.items():
            stream.load_state_dict(state["streams"][lang])
        self.skipped.clear()
        self.skipped.update(state["skipped"])
