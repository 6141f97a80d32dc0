"""Invariants of the greedy concatenate-and-split packer (data/packing.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.packing import IGNORE_INDEX, PackedRows, SequencePacker, next_token_labels

SEED = 1234

# Lengths chosen to hit the edges for seq_len = 8: a 1-token document, documents of exactly
# seq_len, one longer than several rows, and everything in between. Each token encodes its
# document and offset (1000 * doc + offset), so a misplaced token is easy to spot and no two
# tokens anywhere in the corpus are equal.
LENGTHS = [1, 8, 37, 3, 5, 8, 13, 2, 1, 7, 30, 4, 16, 9]
DOCS: list[list[int]] = [[1000 * d + i for i in range(n)] for d, n in enumerate(LENGTHS)]
TOTAL = sum(LENGTHS)  # 144 = 8 * 18: with seq_len 8 the epoch ends exactly at a row end


def tokenize(index: int) -> list[int]:
    return DOCS[index]


def make_packer(seq_len: int = 8, seed: int = SEED, docs: list[list[int]] = DOCS) -> SequencePacker:
    return SequencePacker(len(docs), lambda i: docs[i], seq_len, seed)


def epoch_order(epoch: int, seed: int = SEED, n: int = len(DOCS)) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_stream(epoch: int, seed: int = SEED) -> list[int]:
    return [t for d in epoch_order(epoch, seed) for t in DOCS[int(d)]]


def stream(epochs: int, seed: int = SEED) -> list[int]:
    return [t for e in range(epochs) for t in epoch_stream(e, seed)]


def pieces(row_ids: np.ndarray) -> list[slice]:
    """The [start, stop) spans of a row's document pieces, from its document_ids."""
    bounds = [0, *(np.flatnonzero(np.diff(row_ids)) + 1).tolist(), len(row_ids)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def rows_until_epoch(packer: SequencePacker, epoch: int) -> list[np.ndarray]:
    rows = []
    while packer.state.epoch < epoch:
        rows.append(packer.next_row()[0])
        assert len(rows) < 10_000, "the packer never reached the epoch"
    return rows


def assert_rows_equal(a: PackedRows, b: PackedRows) -> None:
    for name in ("tokens", "document_ids", "positions", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- token accounting -------------------------------------------------------------------------


def test_epoch_orders_differ_so_boundary_tests_are_meaningful():
    assert not np.array_equal(epoch_order(0), epoch_order(1))
    assert sorted(epoch_order(0).tolist()) == list(range(len(DOCS)))


@pytest.mark.parametrize("seq_len", [1, 5, 8, 17, 100, 144, 200])
def test_one_epoch_emits_every_token_once_in_epoch_order(seq_len):
    packer = make_packer(seq_len)
    rows = rows_until_epoch(packer, 1)
    emitted = np.concatenate(rows).tolist()
    epoch0 = epoch_stream(0)
    # The row that finished epoch 0 may already hold the head of epoch 1: exactly the tokens
    # of epoch 1's first `cursor` documents plus `offset` tokens of the next one.
    assert packer.state.epoch == 1
    order1 = epoch_order(1)
    spill = sum(LENGTHS[int(d)] for d in order1[: packer.state.cursor]) + packer.state.offset
    assert emitted[: len(epoch0)] == epoch0
    assert emitted[len(epoch0) :] == epoch_stream(1)[:spill]
    assert len(emitted) == len(epoch0) + spill == len(rows) * seq_len
    # The row before the last one had not finished the epoch: no surplus row was produced.
    assert (len(rows) - 1) * seq_len < len(epoch0)


def test_epoch_ending_exactly_at_a_row_end_leaves_nothing_over():
    packer = make_packer(8)
    rows = rows_until_epoch(packer, 1)
    assert len(rows) == TOTAL // 8
    assert (packer.state.epoch, packer.state.cursor, packer.state.offset) == (1, 0, 0)
    assert np.concatenate(rows).tolist() == epoch_stream(0)


@pytest.mark.parametrize("seq_len", [1, 7, 8, 50, 300])
def test_stream_over_several_epochs_follows_each_epochs_own_order(seq_len):
    packer = make_packer(seq_len)
    n_rows = -(-3 * TOTAL // seq_len)  # enough rows to reach into the fourth epoch
    emitted = packer.next_rows(n_rows).tokens.reshape(-1).tolist()
    assert packer.state.epoch >= 3
    assert emitted == stream(packer.state.epoch + 1)[: n_rows * seq_len]


def test_row_that_spans_more_than_two_epochs_is_filled_in_order():
    packer = make_packer(seq_len=2 * TOTAL + 5)
    row = packer.next_row()[0].tolist()
    assert row == stream(3)[: 2 * TOTAL + 5]
    assert packer.state.epoch == 2


# --- per-row structure ------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 3, 8, 20])
def test_rows_have_int64_fields_of_shape_rows_by_seq_len(seq_len):
    batch = make_packer(seq_len).next_rows(6)
    assert len(batch) == 6
    for name in ("tokens", "document_ids", "positions", "labels"):
        field = getattr(batch, name)
        assert field.dtype == np.int64, name
        assert field.shape == (6, seq_len), name


@pytest.mark.parametrize("seq_len", [1, 2, 8, 11, 40])
def test_document_ids_positions_and_labels_describe_each_piece(seq_len):
    batch = make_packer(seq_len).next_rows(-(-2 * TOTAL // seq_len))
    saw_multi_piece_row = False
    for tokens, ids, positions, labels in zip(
        batch.tokens, batch.document_ids, batch.positions, batch.labels, strict=True
    ):
        assert ids[0] == 0
        assert set(np.diff(ids).tolist()) <= {0, 1}
        spans = pieces(ids)
        saw_multi_piece_row |= len(spans) > 1
        for piece_id, span in enumerate(spans):
            assert (ids[span] == piece_id).all()
            np.testing.assert_array_equal(positions[span], np.arange(span.stop - span.start))
            # Inside a piece the label is the next token; at its last token it is ignored.
            np.testing.assert_array_equal(labels[span][:-1], tokens[span][1:])
            assert labels[span][-1] == IGNORE_INDEX
            # A piece is a contiguous run of one document (tokens are 1000 * doc + offset).
            docs_in_piece = set((tokens[span] // 1000).tolist())
            assert len(docs_in_piece) == 1
            assert (np.diff(tokens[span]) == 1).all()
        assert labels[-1] == IGNORE_INDEX
    if seq_len > 1:
        assert saw_multi_piece_row


def test_next_token_labels_ignores_piece_boundaries_and_the_last_position():
    tokens = np.array([[10, 11, 12, 20, 21, 30]])
    ids = np.array([[0, 0, 0, 1, 1, 2]])
    expected = [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]]
    assert next_token_labels(tokens, ids).tolist() == expected


def test_only_first_piece_of_a_row_can_be_a_continuation():
    packer = make_packer(8)
    batch = packer.next_rows(TOTAL // 8)
    for tokens, ids in zip(batch.tokens, batch.document_ids, strict=True):
        for span in pieces(ids)[1:]:
            assert tokens[span][0] % 1000 == 0, "a later piece must start a document"


def test_long_document_continues_at_the_start_of_the_next_rows():
    long_doc = list(range(500, 535))  # 35 tokens over rows of 8: 5 + 8 + 8 + 8 + 6
    docs = [[1, 2, 3], long_doc, [7, 8]]
    seed = next(s for s in range(100) if epoch_order(0, s, 3).tolist() == [0, 1, 2])
    batch = make_packer(8, seed, docs).next_rows(6)
    flat = batch.tokens.reshape(-1).tolist()
    assert flat[:40] == [1, 2, 3, *long_doc, 7, 8]
    # Row 0: [1 2 3 | 500..504]; rows 1-3 are all continuation; row 4: [529..534 | 7 8].
    assert batch.document_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch.positions[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    for row in (1, 2, 3):
        assert (batch.document_ids[row] == 0).all()
        assert batch.positions[row].tolist() == list(range(8))
        assert batch.tokens[row][0] == long_doc[5 + 8 * (row - 1)]
        assert batch.labels[row][-1] == IGNORE_INDEX  # continuation in the next row: no label
    assert batch.tokens[4].tolist() == [*long_doc[-6:], 7, 8]
    assert batch.positions[4].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert batch.document_ids[4].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert batch.labels[4][5] == IGNORE_INDEX  # the long document's last token
    assert batch.labels[0][2] == IGNORE_INDEX  # 3 must not be trained to predict 500


# --- state_dict / load_state_dict ---------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [5, 8, 13])
def test_restored_packer_continues_bitwise_identically_after_any_row(seq_len):
    n_rows = -(-2 * TOTAL // seq_len) + 2
    ahead = 4
    reference = make_packer(seq_len)
    states, batches = [], []
    for _ in range(n_rows + ahead):
        states.append(reference.state_dict())
        batches.append(reference.next_rows(1))
    kinds = set()
    for k in range(n_rows):
        state = states[k]
        kinds.add("mid_document" if state["offset"] else "document_start")
        kinds.add(f"epoch{state['epoch']}")
        restored = make_packer(seq_len)
        restored.next_rows(3)  # a packer that has moved on must also restore exactly
        restored.load_state_dict(json.loads(json.dumps(state)))
        for i in range(ahead):
            assert_rows_equal(restored.next_rows(1), batches[k + i])
        assert restored.state_dict() == states[k + ahead]
    assert {"mid_document", "document_start", "epoch0", "epoch1", "epoch2"} <= kinds


def test_restore_in_the_middle_of_the_row_that_crosses_the_epoch_boundary():
    seq_len = 10  # 144 = 14 * 10 + 4: row 14 holds the end of epoch 0 and the start of epoch 1
    packer = make_packer(seq_len)
    packer.next_rows(14)
    state = packer.state_dict()
    assert state["epoch"] == 0 and TOTAL - 14 * seq_len == 4
    expected = packer.next_rows(5)
    assert packer.state.epoch == 1
    restored = make_packer(seq_len)
    restored.load_state_dict(state)
    assert_rows_equal(restored.next_rows(5), expected)
    assert expected.tokens.reshape(-1).tolist() == stream(2)[14 * seq_len : 19 * seq_len]


def test_state_dict_is_plain_ints_naming_position_and_identity():
    packer = make_packer(8)
    packer.next_rows(3)
    state = packer.state_dict()
    assert set(state) == {"epoch", "cursor", "offset", "num_documents", "seed"}
    assert all(type(v) is int for v in state.values())
    assert state["num_documents"] == len(DOCS) and state["seed"] == SEED
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize(
    ("key", "other"),
    [("num_documents", {"docs": DOCS[:-1]}), ("seed", {"seed": SEED + 1})],
)
def test_loading_state_from_other_data_or_seed_raises_naming_the_key(key, other):
    source = make_packer(8)
    source.next_rows(2)
    target = make_packer(8, **other)
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(source.state_dict())


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_rows():
    assert_rows_equal(make_packer(8).next_rows(40), make_packer(8).next_rows(40))


def test_different_seed_gives_a_different_document_order():
    a = make_packer(8, seed=SEED).next_rows(TOTAL // 8)
    b = make_packer(8, seed=SEED + 1).next_rows(TOTAL // 8)
    assert not np.array_equal(a.tokens, b.tokens)
    # Still the same multiset of tokens: only the order changes.
    assert sorted(a.tokens.reshape(-1).tolist()) == sorted(b.tokens.reshape(-1).tolist())
    assert b.tokens.reshape(-1).tolist() == epoch_stream(0, SEED + 1)


# --- errors -------------------------------------------------------------------------------------


def test_document_that_tokenizes_to_nothing_raises_naming_it():
    docs = [[1, 2], [], [3]]
    packer = make_packer(4, docs=docs)
    with pytest.raises(ValueError, match="document 1 tokenized to nothing"):
        packer.next_rows(3)


def test_packer_without_documents_raises():
    with pytest.raises(ValueError, match="at least one document"):
        SequencePacker(0, tokenize, 8, SEED)
