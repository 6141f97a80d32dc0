"""Synthetic long-context documents: a pass key hidden in multilingual filler, asked for at the end.

A passkey document of exactly `n_tokens` tokens is laid out as

    <bos> filler... NEEDLE filler... QUESTION ANSWER "." <eos>

    NEEDLE   = "\\nThe pass key is 71432. Remember it. 71432 is the pass key.\\n"
    QUESTION = "\\nWhat is the pass key? The pass key is "
    ANSWER   = "71432"

The filler is text of the corpus in a few languages (drawn from the seed), passage after
passage, cycled when the corpus is shorter than the document. The needle sits after
`round(depth * filler_tokens)` filler tokens: depth 0 right after `<bos>`, depth 1 right
before the question. The key's tokens are encoded once and reused in the needle and the
answer, so the answer is a copy of needle tokens whatever the tokenizer merges. Everything is
a pure function of (tokenizer, filler passages, n_tokens, depth, seed): training (the loader's
`data.passkey_fraction`) and evaluation (trainer/eval.py) draw the same kind of documents.

`PasskeySource` puts passkey documents into a document stream: document k (0-based) is a
passkey document when floor((k + 1) f) > floor(k f), so exactly floor(n f) of the first n
documents are, evenly spread, and the state is two counters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.packing import DocumentSource, EncodedDocument
from data.pretokenized import TokenizedDocument
from data.shards import Document
from data.tokenizer import Tokenizer

PASSKEY_LANG = "passkey"
"""The `lang` of passkey documents in the packed stream: their tokens are accounted apart from
the corpus languages (and never enter the language mixture)."""
NEEDLE_BEFORE, NEEDLE_MIDDLE, NEEDLE_AFTER = (
    "\nThe pass key is ",
    ". Remember it. ",
    " is the pass key.\n",
)
QUESTION = "\nWhat is the pass key? The pass key is "
ANSWER_END = "."
PASSAGE_SEPARATOR = "\n\n"
DEFAULT_DIGITS = 5
DEFAULT_FILLER_LANGUAGES = 4


@dataclass(frozen=True)
class PasskeyDocument:
    tokens: np.ndarray
    """int64 (n_tokens,): bos ... eos."""
    key: str
    depth: float
    """The requested depth in [0, 1]: the share of the filler placed before the needle."""
    needle: tuple[int, int]
    """[start, end) of the needle sentence's tokens."""
    question: tuple[int, int]
    """[start, end) of the question's tokens."""
    answer: tuple[int, int]
    """[start, end) of the key's tokens at the end: what a model must predict."""
    languages: tuple[str, ...]
    """The filler's languages."""


class FillerPool:
    """Corpus text by language, encoded on first use (bos/eos stripped), for passkey filler."""

    def __init__(
        self,
        documents: Mapping[str, Sequence[Document | TokenizedDocument]],
        tokenizer: Tokenizer,
    ):
        self.tokenizer = tokenizer
        self._documents = {
            lang: docs for lang, docs in sorted(documents.items()) if any(map(_has_text, docs))
        }
        if not self._documents:
            raise ValueError("passkey filler: the corpus has no text documents")
        self.languages = tuple(self._documents)
        self._passages: dict[str, list[np.ndarray]] = {}
        self.separator = np.asarray(tokenizer.encode(PASSAGE_SEPARATOR), dtype=np.int64)
        space = tokenizer.encode(" ")
        self.space = space[0] if len(space) == 1 else None
        """One token that stands in for the bytes of a character cut at a filler boundary."""

    @classmethod
    def from_sources(cls, sources: Sequence[str], tokenizer_spec: str) -> FillerPool:
        from data.loader import load_corpus  # the loader imports this module
        from data.tokenizer import build_tokenizer

        corpus = load_corpus(tuple(sources), "skip", tokenizer_spec)
        return cls(corpus.documents, build_tokenizer(tokenizer_spec))

    def passages(self, lang: str) -> list[np.ndarray]:
        if lang not in self._passages:
            self._passages[lang] = [
                np.concatenate([_text_tokens(doc, self.tokenizer), self.separator])
                for doc in self._documents[lang]
                if _has_text(doc)
            ]
        return self._passages[lang]

    def filler(
        self, n_tokens: int, rng: np.random.Generator, languages: int
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """`n_tokens` of text: passages of `languages` languages taken in turn, then cycled."""
        n = min(languages, len(self.languages))
        chosen = rng.choice(len(self.languages), size=n, replace=False)
        langs = [self.languages[i] for i in sorted(set(chosen.tolist()))]
        orders = [rng.permutation(len(self.passages(lang))) for lang in langs]
        pieces, total, turn = [], 0, 0
        while total < n_tokens:
            lang_index = turn % len(langs)
            order = orders[lang_index]
            passage = self.passages(langs[lang_index])[order[(turn // len(langs)) % len(order)]]
            pieces.append(passage)
            total += len(passage)
            turn += 1
        tokens = np.concatenate(pieces)[:n_tokens] if pieces else np.empty(0, np.int64)
        return tokens, tuple(langs)


def _has_text(doc: Document | TokenizedDocument) -> bool:
    if isinstance(doc, TokenizedDocument):
        return len(doc.tokens) > 2
    return bool(doc.text.strip())


def _text_tokens(doc: Document | TokenizedDocument, tokenizer: Tokenizer) -> np.ndarray:
    if isinstance(doc, TokenizedDocument):
        return np.asarray(doc.tokens[1:-1], dtype=np.int64)  # without bos and eos
    return np.asarray(tokenizer.encode(doc.text.strip()), dtype=np.int64)


def passkey_document(
    tokenizer: Tokenizer,
    filler: FillerPool,
    n_tokens: int,
    *,
    depth: float,
    seed: int | Sequence[int],
    digits: int = DEFAULT_DIGITS,
    languages: int = DEFAULT_FILLER_LANGUAGES,
) -> PasskeyDocument:
    """A passkey document of exactly `n_tokens` tokens, the needle at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must lie in [0, 1]; got {depth}")
    rng = np.random.default_rng(seed)
    key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    encode = _encoder(tokenizer)
    key_tokens = encode(key)
    needle = np.concatenate(
        [encode(NEEDLE_BEFORE), key_tokens, encode(NEEDLE_MIDDLE), key_tokens, encode(NEEDLE_AFTER)]
    )
    question, tail = encode(QUESTION), encode(ANSWER_END)
    special = tokenizer.special
    fixed = 2 + len(needle) + len(question) + len(key_tokens) + len(tail)  # bos and eos too
    if n_tokens < fixed + 16:
        raise ValueError(
            f"a passkey document needs at least {fixed + 16} tokens with this tokenizer "
            f"(needle, question and some filler); asked for {n_tokens}"
        )
    text, langs = filler.filler(n_tokens - fixed, rng, languages)
    before = round(depth * len(text))
    head, rest = _clean_cut(text[:before], filler), _clean_cut(text[before:], filler)
    bos, eos = np.array([special.bos]), np.array([special.eos])
    parts = [bos, head, needle, rest, question, key_tokens, tail, eos]
    bounds = np.cumsum([0, *map(len, parts)]).tolist()
    return PasskeyDocument(
        tokens=np.concatenate(parts).astype(np.int64),
        key=key,
        depth=depth,
        needle=(bounds[2], bounds[3]),
        question=(bounds[4], bounds[5]),
        answer=(bounds[5], bounds[6]),
        languages=langs,
    )


def _encoder(tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
    return lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64)


def _clean_cut(tokens: np.ndarray, filler: FillerPool, span: int = 4) -> np.ndarray:
    """`tokens` with the tokens of a character cut at either end replaced by spaces.

    The filler is cut at token counts, which can split a multi-byte character (always a risk
    with byte-level tokens); its leftover bytes would decode to U+FFFD. The length is kept.
    """
    if filler.space is None or not len(tokens):
        return tokens
    tokens, decode = tokens.copy(), filler.tokenizer.decode
    for cut in range(min(span, len(tokens))):  # the first bytes of a character at the end
        end = len(tokens) - cut
        if not decode(tokens[max(0, end - span) : end].tolist()).endswith("\ufffd"):
            tokens[end:] = filler.space
            break
    for start in range(min(span, len(tokens))):  # the last bytes of a character at the start
        if not decode(tokens[start : start + span].tolist()).startswith("\ufffd"):
            tokens[:start] = filler.space
            break
    return tokens


class PasskeySource:
    """A document stream with passkey documents in place of a fraction of its documents."""

    def __init__(
        self,
        inner: DocumentSource,
        fraction: float,
        make_passkey: Callable[[int], EncodedDocument],
    ):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"data.passkey_fraction must lie in (0, 1]; got {fraction}")
        self.inner, self.fraction, self.make_passkey = inner, fraction, make_passkey
        self.documents = 0
        """Documents served so far, passkey documents included."""
        self.passkeys = 0

    def is_passkey(self, k: int) -> bool:
        return int(np.floor((k + 1) * self.fraction)) > int(np.floor(k * self.fraction))

    def next_document(self) -> EncodedDocument:
        k = self.documents
        document = self.make_passkey(self.passkeys) if self.is_passkey(k) else None
        if document is None:
            document = self.inner.next_document()
        else:
            self.passkeys += 1
        self.documents = k + 1
        return document

    def state_dict(self) -> dict[str, Any]:
        # The inner source's keys plus ours: either kind of loader reads the other's state.
        return {
            **self.inner.state_dict(),
            "passkey": {"documents": self.documents, "passkeys": self.passkeys},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        counters = state.get("passkey", {"documents": 0, "passkeys": 0})
        self.documents, self.passkeys = int(counters["documents"]), int(counters["passkeys"])


def passkey_encoder(
    tokenizer: Tokenizer, filler: FillerPool, n_tokens: int, seed: int
) -> Callable[[int], EncodedDocument]:
    """Passkey document number k for training: depth and key drawn from (seed, k)."""

    def make(k: int) -> EncodedDocument:
        depth = float(np.random.default_rng([seed, k, 1]).uniform())
        document = passkey_document(tokenizer, filler, n_tokens, depth=depth, seed=[seed, k])
        return EncodedDocument(document.tokens, PASSKEY_LANG, name=f"passkey:{k}", keep_whole=True)

    return make
