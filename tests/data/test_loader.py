"""GlobalBatchLoader: world-size-independent, elastically resumable batches (data/loader.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.loader import GlobalBatchLoader, RankSlice, load_documents
from data.packing import PackedRows
from data.shards import Document, write_documents
from data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("tokens", "document_ids", "positions", "labels")
SEQ_LEN = 32
GLOBAL_BATCH = 12  # divides by 1, 2, 3 and 4 ranks
SEED = 7
WORDS = "alpha beta γάμμα дельта 東京 🚀 epsilon zeta".split()


def make_documents(n: int = 24, max_words: int = 16) -> list[Document]:
    """Documents of varied lengths (1 word to far longer than a row), with multi-byte text."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=1 + (i * 7) % max_words)
        text = f"doc{i}: " + " ".join(words.tolist())
        docs.append(Document(f"d{i}", "eng_Latn", text, "memory://synthetic", i + 1))
    return docs


DOCUMENTS = make_documents()


def make_loaders(world_size: int, documents: list[Document] = DOCUMENTS, seq_len: int = SEQ_LEN):
    tokenizer = ByteTokenizer()
    return [
        GlobalBatchLoader(
            documents, tokenizer, seq_len, GLOBAL_BATCH, SEED, RankSlice(r, world_size)
        )
        for r in range(world_size)
    ]


def global_batch(loaders: list[GlobalBatchLoader]) -> PackedRows:
    """Each rank's next batch, concatenated in rank order."""
    parts = [loader.next_batch() for loader in loaders]
    per_rank = GLOBAL_BATCH // len(loaders)
    for part in parts:
        assert part.tokens.shape == (per_rank, SEQ_LEN)
    return PackedRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))


def reference_batches(n: int) -> list[PackedRows]:
    (loader,) = make_loaders(1)
    return [loader.next_batch() for _ in range(n)]


def assert_batches_equal(got: PackedRows, want: PackedRows, where: str) -> None:
    for field in FIELDS:
        np.testing.assert_array_equal(
            getattr(got, field), getattr(want, field), f"{where}: {field}"
        )


def test_corpus_spans_more_than_one_epoch_in_six_batches():
    # The tests below must cross an epoch boundary and include documents longer than a row.
    total = sum(len(d.text.encode()) + 2 for d in DOCUMENTS)
    assert total < 6 * GLOBAL_BATCH * SEQ_LEN
    assert max(len(d.text.encode()) for d in DOCUMENTS) > 3 * SEQ_LEN


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_batches_concatenated_in_rank_order_equal_the_single_rank_batch(world_size):
    reference = reference_batches(8)
    loaders = make_loaders(world_size)
    for step, want in enumerate(reference):
        assert_batches_equal(global_batch(loaders), want, f"W={world_size} batch {step}")


def test_rank_slices_tile_the_global_batch_in_rank_order():
    slices = [RankSlice(r, 4).rows(GLOBAL_BATCH) for r in range(4)]
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_elastic_resume_over_4_then_2_then_3_ranks_replays_the_single_stream():
    reference = reference_batches(6)
    got: list[PackedRows] = []
    state = None
    for world_size in (4, 2, 3):
        loaders = make_loaders(world_size)
        if state is not None:
            assert state["offset"] > 0  # resuming in the middle of a document
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))
        got += [global_batch(loaders) for _ in range(2)]
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states), f"rank states differ at W={world_size}"
        state = states[0]
    assert state["batches_served"] == 6
    assert state["epoch"] >= 1  # the run crossed an epoch boundary
    for step, (g, want) in enumerate(zip(got, reference, strict=True)):
        assert_batches_equal(g, want, f"batch {step}")
    # No row repeated or skipped: every row of the reference appears exactly once, in order.
    rows = np.concatenate([g.tokens for g in got])
    assert np.array_equal(rows, np.concatenate([r.tokens for r in reference]))


def test_resumed_loader_state_matches_an_uninterrupted_loader():
    (straight,) = make_loaders(1)
    for _ in range(5):
        straight.next_batch()
    first = make_loaders(2)[0]
    for _ in range(3):
        first.next_batch()
    second = make_loaders(3)[2]
    second.load_state_dict(first.state_dict())
    for _ in range(2):
        second.next_batch()
    assert second.state_dict() == straight.state_dict()


def test_state_dict_is_a_handful_of_ints():
    (loader,) = make_loaders(1)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    assert all(type(v) is int for v in state.values())
    assert len(state) <= 8
    assert len(json.dumps(state)) < 200


def test_loading_state_from_a_different_corpus_raises():
    (loader,) = make_loaders(1)
    loader.next_batch()
    (other,) = make_loaders(1, documents=DOCUMENTS[:-1])
    with pytest.raises(ValueError, match="num_documents"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize(("global_rows", "world_size"), [(12, 5), (12, 8), (3, 2)])
def test_rank_slice_raises_when_global_batch_does_not_divide(global_rows, world_size):
    with pytest.raises(ValueError, match="does not split"):
        RankSlice(0, world_size).rows(global_rows)


def test_loader_refuses_a_global_batch_that_does_not_split_over_ranks():
    with pytest.raises(ValueError, match="does not split"):
        GlobalBatchLoader(DOCUMENTS, ByteTokenizer(), SEQ_LEN, 10, SEED, RankSlice(1, 4))


def test_load_documents_on_a_source_matching_nothing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no document file"):
        load_documents([str(tmp_path / "absent-*.jsonl.zst")])


def test_load_documents_reads_the_shipped_sample_corpus():
    documents = load_documents([str(REPO / "data" / "sample" / "*.jsonl.zst")])
    assert len(documents) > 1000
    assert all(d.text for d in documents)


def test_load_documents_reads_written_shards_in_sorted_source_order(tmp_path):
    records = [{"id": f"r{i}", "lang": "eng_Latn", "text": f"text {i} ✓"} for i in range(6)]
    write_documents(str(tmp_path / "part-1.jsonl.zst"), records[3:])
    write_documents(str(tmp_path / "part-0.jsonl.zst"), records[:3])
    documents = load_documents([str(tmp_path / "part-*.jsonl.zst")])
    assert [(d.id, d.text) for d in documents] == [(r["id"], r["text"]) for r in records]


def test_byte_tokenized_pieces_decode_back_to_the_documents():
    tokenizer = ByteTokenizer()
    bos, eos = tokenizer.special.bos, tokenizer.special.eos
    # Every document (bos + bytes + eos) is shorter than a row, so most are whole pieces.
    docs = [
        Document(f"s{i}", "eng_Latn", text, "memory://short", i + 1)
        for i, text in enumerate(
            ["a", "hi there", "γειά σου", "日本語", "🚀 go", "x y z", "café", "end."] * 2
        )
    ]
    assert max(len(tokenizer.encode(d.text, bos=True, eos=True)) for d in docs) < SEQ_LEN
    (loader,) = make_loaders(1, documents=docs)
    batch = loader.next_batch()  # 12 rows of 32 tokens: more than two epochs of this corpus
    order = [int(i) for e in range(4) for i in np.random.default_rng([SEED, e]).permutation(16)]
    whole_pieces = 0
    stitched: list[int] = []
    for tokens, ids in zip(batch.tokens, batch.document_ids, strict=True):
        bounds = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), SEQ_LEN]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            piece = tokens[a:b].tolist()
            stitched += piece
            if piece[0] == bos and piece[-1] == eos:
                whole_pieces += 1
                doc = docs[order[stitched.count(bos) - 1]]
                assert tokenizer.decode(piece) == tokenizer.decode([bos]) + doc.text + (
                    tokenizer.decode([eos])
                )
            elif piece[0] == bos:
                assert b == SEQ_LEN, "a cut piece must be the last of its row"
            else:
                assert a == 0, "a continuation must open its row"
    assert whole_pieces > 20
    # Continuations joined back onto their heads reproduce every document, in epoch order.
    expected = [t for i in order for t in tokenizer.encode(docs[i].text, bos=True, eos=True)]
    assert stitched == expected[: len(stitched)]


def test_rank_slice_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        RankSlice(2, 2)
