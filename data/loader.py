"""A deterministic, resumable batch stream whose global order does not depend on the world size.

Every rank runs the same pipeline (mixture of per-language shuffled streams -> encode -> pack)
over the same documents with the same seed, so all ranks see the same global stream of rows;
rank r of W keeps rows [r * G / W, (r + 1) * G / W) of each global batch of G rows, with their
image tiles. The state is the pipeline's position (a few integers per language), identical on
every rank, so a checkpoint taken with one number of ranks resumes the same global stream with
another. `BackgroundLoader` runs the pipeline in worker processes: worker w of k materialises
global batches b = w (mod k) and only plans the others, so batches arrive in order.

Long-context stages (DataSpec's last four fields, all off by default): a share of the documents
can be synthetic passkey documents (data/passkey.py; part of the stream's state, accounted as
the language "passkey", outside the language mixture); documents below a length can be left
out (counted as skipped, by reason, when the corpus is read); and long documents can be kept
whole by the packer (data/packing.py).
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import queue
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from data.encode import encode_document
from data.languages import LANGUAGES
from data.media import MediaConfig
from data.mixture import mixture_from_config, share_report
from data.packing import DocumentSource, EncodedDocument, RowPacker, stack_rows
from data.passkey import PASSKEY_LANG, FillerPool, PasskeySource, passkey_encoder
from data.pretokenized import TokenizedDocument, read_token_shard
from data.shards import (
    TOKEN_SHARD_SUFFIX,
    Document,
    DocumentError,
    expand_sources,
    iter_documents,
)
from data.sources import BadDocument, MixtureSource
from data.tokenizer import Tokenizer, build_tokenizer


@dataclass(frozen=True)
class DataSpec:
    """Everything that defines the global stream of rows (and nothing about the ranks)."""

    sources: tuple[str, ...]
    tokenizer: str
    seq_len: int
    global_batch_size: int
    seed: int
    mixture: str = "natural"
    temperature: float = 1.0
    unimax_max_epochs: float = 4.0
    budget_tokens: int = 0
    """Tokens the run will train on (UniMax spreads this budget)."""
    on_error: str = "raise"
    media: MediaConfig = field(default_factory=MediaConfig)
    manifest: str = ""
    """A `python -m data.prepare scan` manifest whose token counts (text + media blocks) set the
    mixture; empty: count the corpus's text tokens at start-up."""
    passkey_fraction: float = 0.0
    """Share of the documents replaced by synthetic passkey documents (data/passkey.py)."""
    passkey_tokens: int = 0
    """Length of each passkey document; 0: seq_len. Never more than seq_len (kept whole)."""
    min_document_tokens: int = 0
    """Documents shorter than this (in tokens, bos and eos included) are left out."""
    whole_long_documents: int = 0
    """Documents of at least this many tokens that fit in a row are never cut; 0: off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.passkey_fraction <= 1.0:
            raise ValueError(
                f"data.passkey_fraction must lie in [0, 1]; got {self.passkey_fraction}"
            )
        for key in ("passkey_tokens", "min_document_tokens", "whole_long_documents"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0; got {getattr(self, key)}")
        if self.passkey_tokens > self.seq_len:
            raise ValueError(
                f"data.passkey_tokens ({self.passkey_tokens}) must be at most training.seq_len "
                f"({self.seq_len}): a passkey document is never cut over rows"
            )


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


@dataclass
class Batch:
    """One rank's rows of a global batch, as numpy arrays."""

    tokens: np.ndarray
    document_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray | None
    """(tiles, 3, H, W) float32 in the order of the rows' patch runs, or None without images."""
    tile_rows: np.ndarray
    """(tiles,) the row of each tile."""

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice) -> Batch:
        keep = (self.tile_rows >= rows.start) & (self.tile_rows < rows.stop)
        pixels = None if self.pixel_values is None else self.pixel_values[keep]
        return Batch(
            self.tokens[rows],
            self.document_ids[rows],
            self.positions[rows],
            self.labels[rows],
            pixels if pixels is None or len(pixels) else None,
            self.tile_rows[keep] - rows.start,
        )


@dataclass
class Corpus:
    documents: dict[str, list[Document | TokenizedDocument]]
    """Documents by language, in source order."""
    skipped: dict[str, int]
    """Records skipped while reading (data.on_error = "skip"), by reason."""


def load_corpus(sources: tuple[str, ...], on_error: str, tokenizer_spec: str) -> Corpus:
    """Read every document; bad records and missing sources raise or are counted.

    JSON shards give `Document`s, pre-tokenized shards (`.tokens.zst`) `TokenizedDocument`s.
    """
    skipped: dict[str, int] = {}

    def count(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    paths: list[str] = []
    for source in sources:
        try:
            paths += expand_sources([source])
        except FileNotFoundError:
            if on_error == "raise":
                raise
            count("missing_source")
    documents: dict[str, list[Document | TokenizedDocument]] = {}
    for path in paths:
        on_bad = None if on_error == "raise" else (lambda error: count("bad_record"))
        try:
            if path.endswith(TOKEN_SHARD_SUFFIX):
                records = read_token_shard(path, tokenizer_spec)
            else:
                records = iter_documents(path, on_error=on_bad)
            for document in records:
                if document.lang in LANGUAGES:
                    documents.setdefault(document.lang, []).append(document)
                elif on_error == "raise":
                    raise DocumentError(
                        document.source,
                        document.line,
                        f"unknown language code {document.lang!r} (not FLORES-200)",
                    )
                else:
                    count("unknown_language")
        except DocumentError:
            if on_error == "raise":
                raise
            count("unreadable_shard")
    if not documents:
        raise ValueError(f"no documents found in data.sources = {list(sources)}")
    return Corpus(documents, skipped)


def document_tokens_at_least(
    document: Document | TokenizedDocument, tokenizer: Tokenizer, media: MediaConfig, n: int
) -> int:
    """The document's length in tokens, or a lower bound of it when that bound is >= `n`.

    The text alone gives the bound; only a document with media that the text does not bring to
    `n` is encoded whole (its images decoded). A document that cannot be encoded counts as
    long: it is left to the serving path, which raises or skips it by on_error.
    """
    if isinstance(document, TokenizedDocument):
        return len(document.tokens)
    parts = document.content or ({"type": "text", "text": document.text},)
    text = sum(len(tokenizer.encode(p["text"])) for p in parts if p["type"] == "text") + 2
    if text >= n or all(p["type"] == "text" for p in parts):
        return text
    try:
        return len(encode_document(document, tokenizer, media).tokens)
    except BadDocument:
        return n


def drop_short_documents(
    corpus: Corpus, min_tokens: int, tokenizer: Tokenizer, media: MediaConfig
) -> Corpus:
    """The corpus without its documents of fewer than `min_tokens` tokens, counted as skipped
    ("short_document"); a language left without documents is counted too and is then out of
    the mixture, so a language of short documents only can never stall the stream."""
    documents: dict[str, list[Document | TokenizedDocument]] = {}
    short, emptied, longest = 0, 0, 0
    for lang, docs in corpus.documents.items():
        lengths = [document_tokens_at_least(d, tokenizer, media, min_tokens) for d in docs]
        kept = [d for d, n in zip(docs, lengths, strict=True) if n >= min_tokens]
        short += len(docs) - len(kept)
        longest = max([longest, *lengths])
        if kept:
            documents[lang] = kept
        else:
            emptied += 1
    if not documents:
        raise ValueError(
            f"data.min_document_tokens = {min_tokens} leaves no documents: the longest document "
            f"of data.sources has {longest} tokens"
        )
    skipped = {**corpus.skipped, "short_document": short}
    if emptied:
        skipped["language_without_long_documents"] = emptied
    return Corpus(documents, skipped)


def manifest_token_counts(path: str, tokenizer_spec: str) -> dict[str, int]:
    """Tokens per language from a scan manifest: text plus image and video block tokens."""
    with fsspec.open(path, "r", encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest["tokenizer"] != tokenizer_spec:
        raise ValueError(
            f"{path} counts tokens with {manifest['tokenizer']!r}, but data.tokenizer is "
            f"{tokenizer_spec!r}: re-run `python -m data.prepare scan` with --tokenizer"
        )
    keys = ("tokens", "image_tokens", "video_tokens")
    return {
        lang: sum(int(stats.get(key, 0)) for key in keys)
        for lang, stats in manifest["languages"].items()
    }


def token_counts(corpus: Corpus, tokenizer: Tokenizer) -> dict[str, int]:
    """Text tokens per language, the basis of the mixture weights."""
    return {
        lang: sum(
            len(doc.tokens)
            if isinstance(doc, TokenizedDocument)
            else len(tokenizer.encode(doc.text)) + 2
            for doc in docs
        )
        for lang, docs in corpus.documents.items()
    }


class GlobalBatchLoader:
    """Yields this rank's share of each global batch of packed, document-masked rows."""

    def __init__(self, spec: DataSpec, shard: RankSlice, corpus: Corpus | None = None):
        self.spec, self.shard = spec, shard
        self.rows = shard.rows(spec.global_batch_size)
        full_corpus = corpus or load_corpus(spec.sources, spec.on_error, spec.tokenizer)
        self.tokenizer = build_tokenizer(spec.tokenizer)
        self.corpus = full_corpus
        if spec.min_document_tokens:
            self.corpus = drop_short_documents(
                full_corpus, spec.min_document_tokens, self.tokenizer, spec.media
            )
        self.targets = mixture_from_config(
            spec.mixture,
            self._mixture_counts(),
            temperature=spec.temperature,
            budget_tokens=spec.budget_tokens,
            max_epochs=spec.unimax_max_epochs,
        )
        self.source = MixtureSource(
            {lang: len(docs) for lang, docs in self.corpus.documents.items()},
            self._encode,
            self.targets,
            spec.seed,
            skip_bad=spec.on_error == "skip",
        )
        documents: DocumentSource = self.source
        self.passkeys: PasskeySource | None = None
        if spec.passkey_fraction:
            # Filler from every document, the short ones too: only its text matters.
            filler = FillerPool(full_corpus.documents, self.tokenizer)
            length = spec.passkey_tokens or spec.seq_len
            make = passkey_encoder(self.tokenizer, filler, length, spec.seed)
            documents = self.passkeys = PasskeySource(self.source, spec.passkey_fraction, make)
        special = self.tokenizer.special
        self.packer = RowPacker(
            documents,
            spec.seq_len,
            special.pad,
            special.patch,
            whole_long_documents=spec.whole_long_documents,
        )
        self.batches_served = 0

    def _mixture_counts(self) -> dict[str, int]:
        if not self.spec.manifest:
            return token_counts(self.corpus, self.tokenizer)
        counts = manifest_token_counts(self.spec.manifest, self.spec.tokenizer)
        missing = sorted(set(self.corpus.documents) - set(counts))
        if missing:
            raise ValueError(f"{self.spec.manifest} has no counts for languages {missing[:5]}")
        return {lang: counts[lang] for lang in self.corpus.documents}

    def _encode(self, lang: str, index: int) -> EncodedDocument:
        document = encode_document(
            self.corpus.documents[lang][index], self.tokenizer, self.spec.media
        )
        # Checked here, before the mixture counts the document's tokens as served.
        longest = max((end - start for start, end in document.blocks), default=0)
        if longest > self.spec.seq_len:
            raise BadDocument(
                document.name,
                "oversized_block",
                f"a media block of {longest} tokens does not fit in a row of "
                f"training.seq_len = {self.spec.seq_len}",
            )
        return document

    def next_batch(self, materialize: bool = True) -> Batch | None:
        """The next global batch's rows for this rank; `materialize=False` only advances."""
        rows = [self.packer.next_row() for _ in range(self.spec.global_batch_size)]
        self.batches_served += 1
        if not materialize:
            return None
        mine = rows[self.rows]
        arrays = stack_rows(mine, self.packer)
        tiles = [(i, t) for i, row in enumerate(mine) for block in row.media for t in block]
        pixels = np.stack([t for _, t in tiles]) if tiles else None
        tile_rows = np.array([i for i, _ in tiles], dtype=np.int64)
        return Batch(**arrays, pixel_values=pixels, tile_rows=tile_rows)

    def metrics(self) -> dict[str, float]:
        """Global accounting (identical on every rank): packing, mixture, modality, skips."""
        stats = self.packer.stats
        metrics = {"data/packing_efficiency": stats.efficiency}
        metrics.update(share_report(self.source.sampler.achieved_shares(), self.targets))
        by_modality: dict[str, int] = {}
        for key, n in stats.by_language_modality.items():
            modality = key.rsplit("/", 1)[1]
            by_modality[modality] = by_modality.get(modality, 0) + n
        for modality, n in by_modality.items():
            metrics[f"data/modality/{modality}/share"] = n / max(1, stats.tokens)
        skipped = {**self.corpus.skipped, **self.source.skipped}
        metrics.update({f"data/skipped/{reason}": float(n) for reason, n in skipped.items()})
        if self.passkeys is not None:
            passkey_tokens = stats.by_language_modality.get(f"{PASSKEY_LANG}/text", 0)
            metrics["data/passkey/share"] = passkey_tokens / max(1, stats.tokens)
            metrics["data/passkey/documents"] = float(self.passkeys.passkeys)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"packer": copy.deepcopy(self.packer.state_dict()), "batches": self.batches_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.packer.load_state_dict(state["packer"])
        self.batches_served = int(state["batches"])


@dataclass(frozen=True)
class WorkerFailure:
    """Sent instead of a batch when a worker fails, so the trainer raises the real error."""

    message: str


def _worker(spec, shard, state, worker, n_workers, batches: mp.Queue, stop) -> None:
    # Exit without waiting for unread batches to be flushed into the pipe (a batch of image
    # tiles is larger than a pipe's buffer): a stopped worker's batches are never wanted.
    batches.cancel_join_thread()
    try:
        loader = GlobalBatchLoader(spec, shard)
        if state is not None:
            loader.load_state_dict(state)
        while not stop.is_set():
            mine = loader.batches_served % n_workers == worker
            batch = loader.next_batch(materialize=mine)
            if mine:
                _put(batches, (batch, loader.state_dict(), loader.metrics()), stop)
    except Exception as error:  # noqa: BLE001 (forwarded to the trainer, which raises it)
        _put(batches, WorkerFailure(f"{type(error).__name__}: {error}"), stop)


def _put(batches: mp.Queue, item: Any, stop) -> None:
    while not stop.is_set():
        try:
            batches.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


class BackgroundLoader:
    """The same stream as GlobalBatchLoader, produced ahead by `num_workers` processes."""

    def __init__(self, spec: DataSpec, shard: RankSlice, num_workers: int, prefetch: int = 2):
        self.spec, self.shard = spec, shard
        self.num_workers, self.prefetch = num_workers, prefetch
        self._state: dict[str, Any] | None = None
        self._metrics: dict[str, float] = {}
        # Spawned, not forked: the training process holds threads (gloo, OpenMP) that a fork
        # would copy in an undefined state.
        self._context = mp.get_context("spawn")
        self._workers: list[Any] = []

    def _start(self) -> None:
        """Start the workers at the current state (lazily: a resume first sets the state)."""
        self.close()
        self._stop = self._context.Event()
        self._queues = [self._context.Queue(self.prefetch) for _ in range(self.num_workers)]
        self._next = 0 if self._state is None else int(self._state["batches"])
        self._workers = [
            self._context.Process(
                target=_worker,
                args=(self.spec, self.shard, self._state, w, self.num_workers, q, self._stop),
                daemon=True,
            )
            for w, q in enumerate(self._queues)
        ]
        for process in self._workers:
            process.start()

    def next_batch(self) -> Batch:
        if not self._workers:
            self._start()
        source = self._queues[self._next % self.num_workers]
        while True:
            try:
                item = source.get(timeout=5.0)
                break
            except queue.Empty:
                dead = [p.exitcode for p in self._workers if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a data loader worker died (exit codes {dead})") from None
        if isinstance(item, WorkerFailure):
            self.close()
            raise RuntimeError(f"data loader worker failed: {item.message}")
        batch, self._state, self._metrics = item
        self._next += 1
        return batch

    def metrics(self) -> dict[str, float]:
        return self._metrics

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            return GlobalBatchLoader(self.spec, self.shard).state_dict()
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self._state = state

    def close(self) -> None:
        if not self._workers:
            return
        self._stop.set()
        for process in self._workers:
            process.join(timeout=2)
            if process.is_alive():
                process.terminate()
                process.join()
        for batches in self._queues:
            batches.cancel_join_thread()
            batches.close()
        self._workers = []
