"""Pre-tokenized shards: documents stored as token ids, read without JSON parsing or tokenizing.

A `.tokens.zst` shard is one zstd stream: a JSON header line, then every document's tokens as
little-endian uint32, back to back. The header names the tokenizer (a run with another one is
refused) and lists each document's id, language, origin (file:line of the JSON record) and token
count. Documents with media are not pre-tokenized: their pixels are decoded at training time, so
`tokenize` leaves them to the JSON shards and counts them in the header.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import zstandard

from data.shards import TOKEN_SHARD_SUFFIX, Document
from data.tokenizer import Tokenizer

SUFFIX = TOKEN_SHARD_SUFFIX
_FORMAT = "fusiontrain-tokens-v1"


@dataclass(frozen=True)
class TokenizedDocument:
    """A text document as token ids (bos and eos included)."""

    id: str
    lang: str
    tokens: np.ndarray
    source: str
    line: int


def tokenize_documents(
    documents: Iterable[Document], tokenizer: Tokenizer
) -> Iterator[TokenizedDocument]:
    for doc in documents:
        if doc.content is not None and any(part["type"] != "text" for part in doc.content):
            continue
        ids = tokenizer.encode(doc.text, bos=True, eos=True)
        yield TokenizedDocument(doc.id, doc.lang, np.asarray(ids, np.uint32), doc.source, doc.line)


def write_token_shard(
    path: str, documents: Iterable[TokenizedDocument], tokenizer_spec: str, level: int = 3
) -> int:
    """Write one shard; returns the number of documents."""
    docs = list(documents)
    header = {
        "format": _FORMAT,
        "tokenizer": tokenizer_spec,
        "documents": [[d.id, d.lang, d.source, d.line, len(d.tokens)] for d in docs],
    }
    body = np.concatenate([d.tokens for d in docs]) if docs else np.empty(0, np.uint32)
    raw = json.dumps(header).encode() + b"\n" + body.astype("<u4").tobytes()
    with fsspec.open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=level).compress(raw))
    return len(docs)


def read_token_shard(path: str, tokenizer_spec: str) -> list[TokenizedDocument]:
    """Every document of a shard; refuses a shard made with another tokenizer."""
    with fsspec.open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        stream = io.BufferedReader(reader)
        try:
            header = json.loads(stream.readline())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a pre-tokenized shard ({error})") from None
        body = np.frombuffer(stream.read(), dtype="<u4").astype(np.int64)
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown pre-tokenized format {header.get('format')!r}")
    if header["tokenizer"] != tokenizer_spec:
        raise ValueError(
            f"{path} was tokenized with {header['tokenizer']!r}, but data.tokenizer is "
            f"{tokenizer_spec!r}: re-run `python -m data.prepare tokenize`"
        )
    lengths = [entry[4] for entry in header["documents"]]
    if sum(lengths) != len(body):
        raise ValueError(f"{path}: header lists {sum(lengths)} tokens, the shard has {len(body)}")
    bounds = np.cumsum([0, *lengths])
    return [
        TokenizedDocument(doc_id, lang, body[a:b], source, line)
        for (doc_id, lang, source, line, _), a, b in zip(
            header["documents"], bounds[:-1], bounds[1:], strict=True
        )
    ]
