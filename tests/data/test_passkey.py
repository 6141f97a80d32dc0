"""Passkey documents (data/passkey.py): exact length, the key at the stated answer span, the
needle at the stated depth, multilingual filler, determinism, and the stream that mixes them in."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from data.loader import load_corpus
from data.passkey import (
    ANSWER_END,
    NEEDLE_AFTER,
    NEEDLE_BEFORE,
    NEEDLE_MIDDLE,
    QUESTION,
    FillerPool,
    PasskeySource,
    passkey_document,
)
from data.shards import Document
from data.tokenizer import ByteTokenizer, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def filler() -> FillerPool:
    corpus = load_corpus(
        (str(REPO / "data" / "sample" / "sample-0000*.jsonl.zst"),), "raise", "byte"
    )
    return FillerPool(corpus.documents, BYTE)


@pytest.fixture(scope="module")
def tiktoken_spec(tmp_path_factory) -> str:
    """A ranks file of the 256 bytes plus a few merges, every pair of digits among them: the key
    then takes fewer tokens than digits, and pieces of the needle are multi-byte tokens."""
    merges = [b"pa", b"ss", b"pass", b" k", b"ey", b" key", b"e "]
    merges += [f"{i:02d}".encode() for i in range(100)]
    lines = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
    lines += [base64.b64encode(m).decode() + f" {256 + i}" for i, m in enumerate(merges)]
    path = tmp_path_factory.mktemp("ranks") / "tiny.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return f"tiktoken:{path}"


def check_layout(doc, tokenizer, n_tokens: int) -> None:
    """Every part where the document says it is, and nothing else but filler."""
    tokens = doc.tokens
    decode = tokenizer.decode
    assert len(tokens) == n_tokens and tokens.dtype == np.int64
    assert tokens[0] == tokenizer.special.bos and tokens[-1] == tokenizer.special.eos
    a, b = doc.answer
    assert decode(tokens[a:b].tolist()) == doc.key and len(doc.key) == 5 and doc.key.isdigit()
    assert decode(tokens[b:-1].tolist()) == ANSWER_END
    assert doc.question == (doc.question[0], a)
    assert decode(tokens[slice(*doc.question)].tolist()) == QUESTION
    needle = f"{NEEDLE_BEFORE}{doc.key}{NEEDLE_MIDDLE}{doc.key}{NEEDLE_AFTER}"
    assert decode(tokens[slice(*doc.needle)].tolist()) == needle
    key_tokens = tokens[a:b].tolist()
    needle_tokens = tokens[slice(*doc.needle)].tolist()
    assert any(
        needle_tokens[i : i + len(key_tokens)] == key_tokens for i in range(len(needle_tokens))
    ), "the answer's tokens appear in the needle"
    filler_tokens = (doc.needle[0] - 1) + (doc.question[0] - doc.needle[1])
    before = doc.needle[0] - 1
    assert before == round(doc.depth * filler_tokens), "needle after depth x filler tokens"
    text = decode(tokens.tolist())
    assert "\ufffd" not in text
    assert text.count(doc.key) >= 3


@pytest.mark.parametrize("n_tokens", [256, 4096, 65536, 262144])
def test_length_answer_span_and_needle_depth(filler, n_tokens):
    for depth in (0.0, 0.3, 0.5, 1.0):
        doc = passkey_document(BYTE, filler, n_tokens, depth=depth, seed=[n_tokens, 7])
        check_layout(doc, BYTE, n_tokens)
        assert abs(doc.needle[0] / n_tokens - depth) < 160 / n_tokens
    assert doc.question[0] - doc.needle[1] == 0  # depth 1: right before the question


def test_documents_are_a_function_of_the_seed(filler):
    first = passkey_document(BYTE, filler, 2048, depth=0.4, seed=11)
    again = passkey_document(BYTE, filler, 2048, depth=0.4, seed=11)
    other = passkey_document(BYTE, filler, 2048, depth=0.4, seed=12)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert (first.key, first.needle, first.languages) == (again.key, again.needle, again.languages)
    assert first.key != other.key or first.languages != other.languages
    keys = {passkey_document(BYTE, filler, 512, depth=0.5, seed=s).key for s in range(50)}
    assert len(keys) == 50


def test_filler_is_multilingual_corpus_text(filler):
    doc = passkey_document(BYTE, filler, 32768, depth=0.5, seed=3)
    assert len(doc.languages) == 4 and set(doc.languages) <= set(filler.languages)
    text = BYTE.decode(doc.tokens[: doc.question[0]].tolist())
    whole = {  # the languages of the corpus passages found whole in the filler
        lang
        for lang in filler.languages
        for passage in filler.passages(lang)
        if len(passage) > 40 and BYTE.decode(passage.tolist()) in text
    }
    assert whole == set(doc.languages)


def test_a_short_corpus_is_cycled_to_any_length():
    docs = {
        "eng_Latn": [Document("a", "eng_Latn", "one short line", "x.jsonl", 1)],
        "ell_Grek": [Document("b", "ell_Grek", "μια σύντομη γραμμή", "x.jsonl", 2)],
    }
    pool = FillerPool(docs, BYTE)
    doc = passkey_document(BYTE, pool, 32768, depth=0.75, seed=1)
    check_layout(doc, BYTE, 32768)
    assert set(doc.languages) == {"eng_Latn", "ell_Grek"}


def test_a_bpe_tokenizer_keeps_the_layout(tiktoken_spec):
    tokenizer = build_tokenizer(tiktoken_spec)
    corpus = load_corpus(
        (str(REPO / "data" / "sample" / "sample-00000*.jsonl.zst"),), "raise", "byte"
    )
    pool = FillerPool(corpus.documents, tokenizer)
    lengths = set()
    for seed in range(20):
        doc = passkey_document(tokenizer, pool, 3000, depth=seed / 19, seed=seed)
        check_layout(doc, tokenizer, 3000)
        lengths.add(doc.answer[1] - doc.answer[0])
    assert lengths == {3}  # 5 digits: 3 + 2 by the pattern, then 2 + 1 and 2 by the merges


def test_too_short_a_document_is_refused_with_the_minimum(filler):
    with pytest.raises(ValueError, match=r"needs at least \d+ tokens .* asked for 100"):
        passkey_document(BYTE, filler, 100, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="depth must lie in"):
        passkey_document(BYTE, filler, 1000, depth=1.5, seed=0)


class Counter:
    """A DocumentSource of numbered one-token documents."""

    def __init__(self):
        self.n = 0

    def next_document(self):
        from data.packing import EncodedDocument

        self.n += 1
        return EncodedDocument(np.array([self.n]), "eng_Latn")

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1 / 3, 1.0])
def test_passkey_source_replaces_exactly_floor_n_f_documents_and_resumes(fraction):
    from data.packing import EncodedDocument

    def make(k):
        return EncodedDocument(np.array([-1 - k]), "passkey")

    source = PasskeySource(Counter(), fraction, make)
    stream = [int(source.next_document().tokens[0]) for _ in range(90)]
    for n in range(1, 91):
        assert sum(t < 0 for t in stream[:n]) == int(np.floor(n * fraction + 1e-9))
    assert [t for t in stream if t < 0] == [-1 - k for k in range(sum(t < 0 for t in stream))]
    assert [t for t in stream if t > 0] == list(range(1, sum(t > 0 for t in stream) + 1))
    resumed = PasskeySource(Counter(), fraction, make)
    replay = PasskeySource(Counter(), fraction, make)
    for _ in range(37):
        replay.next_document()
    resumed.load_state_dict(replay.state_dict())
    assert [int(resumed.next_document().tokens[0]) for _ in range(53)] == stream[37:]
