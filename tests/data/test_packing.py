"""RowPacker (data/packing.py): early-fusion rows of exactly seq_len, never splitting a media block.

The documents are synthetic: token `offset` of document `d` is `1000 * (d + 1) + offset`, so every
token in the corpus is unique and names its document and offset, except the inside of a media
block, which is `<|patch|>` as in a real image block. A misplaced, dropped or repeated token shows.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from data.packing import (
    IGNORE_INDEX,
    EncodedDocument,
    OversizedBlockError,
    PackedRow,
    RowPacker,
    stack_rows,
)
from data.tokenizer import ByteTokenizer

SPECIAL = ByteTokenizer().special
PAD, PATCH = SPECIAL.pad, SPECIAL.patch
SEED = 1234


def make_document(
    d: int, length: int, blocks: tuple[tuple[int, int], ...] = (), lang: str = "eng_Latn"
) -> EncodedDocument:
    tokens = 1000 * (d + 1) + np.arange(length, dtype=np.int64)
    for start, end in blocks:
        tokens[start + 1 : end - 1] = PATCH  # first and last token of a block stay unique
    media = tuple(f"doc{d}/block{j}" for j in range(len(blocks)))
    return EncodedDocument(tokens, lang, blocks, media, f"synthetic.jsonl:{d + 1}")


class EpochSource:
    """A tiny DocumentSource: the documents in a seeded order per epoch (in list order when
    `seed` is None), a fresh EncodedDocument object per fetch, as a real encoder returns."""

    def __init__(self, documents: list[EncodedDocument], seed: int | None = SEED):
        self.documents, self.seed = documents, seed
        self.epoch, self.cursor = 0, 0

    def order(self, epoch: int) -> list[int]:
        n = len(self.documents)
        if self.seed is None:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def next_document(self) -> EncodedDocument:
        document = self.documents[self.order(self.epoch)[self.cursor]]
        self.cursor += 1
        if self.cursor == len(self.documents):
            self.epoch, self.cursor = self.epoch + 1, 0
        return dataclasses.replace(document)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def stream(documents: list[EncodedDocument], epochs: int, seed: int | None = SEED):
    source = EpochSource(documents, seed)
    return [documents[i] for e in range(epochs) for i in source.order(e)]


def make_packer(documents, seq_len, seed: int | None = SEED, skip_oversized=False) -> RowPacker:
    return RowPacker(EpochSource(documents, seed), seq_len, PAD, PATCH, skip_oversized)


# Text only. Lengths hit the edges for seq_len 8: a 1-token document, documents of exactly
# seq_len, one longer than several rows. 144 = 8 * 18, so an epoch can end exactly at a row end.
TEXT_LENGTHS = [1, 8, 37, 3, 5, 8, 13, 2, 1, 7, 30, 4, 16, 9]
TEXT = [
    make_document(d, n, lang=("eng_Latn", "fra_Latn")[d % 2]) for d, n in enumerate(TEXT_LENGTHS)
]

# Text and media for seq_len >= 16: a block of 10, two adjacent blocks, a block of exactly 16,
# video-like blocks with a separator token between frames, a block that ends its document.
MIXED = [
    make_document(0, 5),
    make_document(1, 37, lang="fra_Latn"),
    make_document(2, 17, ((3, 13),)),
    make_document(3, 1, lang="fra_Latn"),
    make_document(4, 15, ((1, 7), (7, 13))),
    make_document(5, 20, ((2, 18),), lang="zho_Hans"),
    make_document(6, 16, lang="fra_Latn"),
    make_document(7, 20, ((1, 6), (7, 12), (13, 18)), lang="zho_Hans"),
    make_document(8, 12, ((1, 12),)),
]
LONGEST_BLOCK = 16
OVERSIZED = make_document(9, 30, ((5, 22),), lang="fra_Latn")  # a block of 17 tokens


def pieces(document_ids: np.ndarray) -> list[slice]:
    bounds = [0, *(np.flatnonzero(np.diff(document_ids)) + 1).tolist(), len(document_ids)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_row(row: PackedRow, labels: np.ndarray, documents, seq_len: int):
    """Assert the per-token contract of one row; return its document pieces as
    (document, first offset, length) and the number of padding tokens."""
    for name in ("tokens", "document_ids", "positions"):
        array = getattr(row, name)
        assert array.dtype == np.int64 and array.shape == (seq_len,), name
    assert labels.shape == (seq_len,) and labels[-1] == IGNORE_INDEX
    ids, tokens = row.document_ids, row.tokens
    assert ids[0] == 0 and set(np.diff(ids).tolist()) <= {0, 1}
    spans = pieces(ids)
    padding = int((tokens == PAD).sum())
    if padding:  # padding only at the end, as a piece of its own
        assert spans[-1].stop - spans[-1].start == padding and (tokens[spans[-1]] == PAD).all()
        assert (labels[spans[-1]] == IGNORE_INDEX).all()
        spans = spans[:-1]
    found = []
    for index, span in enumerate(spans):
        length = span.stop - span.start
        np.testing.assert_array_equal(row.positions[span], np.arange(length))
        d, offset = divmod(int(tokens[span.start]), 1000)
        document = documents[d - 1]
        assert offset == 0 or index == 0, "only a row's first piece can be a continuation"
        np.testing.assert_array_equal(tokens[span], document.tokens[offset : offset + length])
        following = tokens[span][1:]
        expected = np.where(following == PATCH, IGNORE_INDEX, following)
        np.testing.assert_array_equal(labels[span][:-1], expected)
        assert labels[span][-1] == IGNORE_INDEX
        for start, end in document.blocks:
            inside = offset <= start and end <= offset + length
            apart = end <= offset or start >= offset + length
            assert inside or apart, f"block [{start}, {end}) of document {d - 1} was split"
        found.append((d - 1, offset, length))
    media, counts = [], {}
    for d, offset, length in found:
        document = documents[d]
        image = 0
        for j, (start, end) in enumerate(document.blocks):
            if offset <= start < offset + length:
                media.append(document.media[j])
                image += end - start
        for modality, n in (("text", length - image), ("image", image)):
            if n:
                key = (document.lang, modality)
                counts[key] = counts.get(key, 0) + n
    assert row.media == media
    assert row.token_counts == counts
    return found, padding


# --- token accounting -------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 5, 8, 17, 100, 300])
def test_text_rows_are_the_document_stream_cut_into_seq_len_over_several_epochs(seq_len):
    packer = make_packer(TEXT, seq_len)
    n_rows = math.ceil(3 * sum(TEXT_LENGTHS) / seq_len) + 1
    rows = [packer.next_row() for _ in range(n_rows)]
    assert all(len(row.tokens) == seq_len for row in rows)
    emitted = np.concatenate([row.tokens for row in rows])
    epochs = math.ceil(n_rows * seq_len / sum(TEXT_LENGTHS))
    expected = np.concatenate([doc.tokens for doc in stream(TEXT, epochs)])[: n_rows * seq_len]
    np.testing.assert_array_equal(emitted, expected)  # nothing dropped, repeated or reordered
    totals: dict[tuple[str, str], int] = {}
    for row in rows:
        for key, n in row.token_counts.items():
            totals[key] = totals.get(key, 0) + n
    langs = [TEXT[t // 1000 - 1].lang for t in emitted.tolist()]
    assert totals == {(lang, "text"): langs.count(lang) for lang in set(langs)}
    stats = packer.stats
    assert (stats.tokens, stats.padding, stats.efficiency) == (n_rows * seq_len, 0, 1.0)
    assert stats.by_language_modality == {f"{k[0]}/{k[1]}": n for k, n in totals.items()}


@pytest.mark.parametrize("seq_len", [LONGEST_BLOCK, 23, 40])
def test_rows_of_text_and_media_keep_every_per_token_contract(seq_len):
    packer = make_packer(MIXED, seq_len)
    n_rows = 3 * sum(len(doc.tokens) for doc in MIXED) // seq_len
    rows = [packer.next_row() for _ in range(n_rows)]
    labels = stack_rows(rows, packer)["labels"]
    stitched, total_padding, layout = [], 0, []
    for row, row_labels in zip(rows, labels, strict=True):
        found, padding = check_row(row, row_labels, MIXED, seq_len)
        stitched += [MIXED[d].tokens[o : o + n] for d, o, n in found]
        total_padding += padding
        layout.append((found, padding))
    expected = np.concatenate([doc.tokens for doc in stream(MIXED, 5)])
    emitted = np.concatenate(stitched)
    np.testing.assert_array_equal(emitted, expected[: len(emitted)])
    # A row is padded only because the block that comes next did not fit in what was left.
    for (found, padding), (next_found, _) in zip(layout[:-1], layout[1:], strict=True):
        if padding:
            d, offset, _ = next_found[0]
            block = MIXED[d].block_starting_at(offset)
            assert block is not None
            start, end = MIXED[d].blocks[block]
            assert end - start > padding
            assert found[-1][0] == d and found[-1][1] + found[-1][2] == offset
    assert total_padding > 0, "the corpus must make the packer pad at this seq_len"
    assert packer.stats.padding == total_padding
    assert packer.stats.tokens == n_rows * seq_len - total_padding
    assert packer.stats.efficiency == pytest.approx(1 - total_padding / (n_rows * seq_len))


# --- media blocks -----------------------------------------------------------------------------


def test_block_that_does_not_fit_pads_the_row_and_opens_the_next_row():
    text = make_document(0, 6)
    with_block = make_document(1, 9, ((1, 7),), lang="fra_Latn")  # block of 6 after 1 token
    packer = make_packer([text, with_block], seq_len=10, seed=None)
    first, second = packer.next_row(), packer.next_row()
    # Row 0: the text document, the first token of the next one, then 3 pads: the block of 6
    # does not fit in the 3 tokens left.
    np.testing.assert_array_equal(first.tokens, [*text.tokens, with_block.tokens[0], *[PAD] * 3])
    assert first.document_ids.tolist() == [0] * 6 + [1] + [2] * 3
    assert first.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 1, 2]
    assert first.media == []
    assert first.token_counts == {("eng_Latn", "text"): 6, ("fra_Latn", "text"): 1}
    # Row 1: the whole block, the rest of its document, then the next epoch's first document.
    np.testing.assert_array_equal(second.tokens, [*with_block.tokens[1:], *text.tokens[:2]])
    assert second.document_ids.tolist() == [0] * 8 + [1, 1]
    assert second.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert second.media == ["doc1/block0"]
    assert second.token_counts == {
        ("fra_Latn", "image"): 6,
        ("fra_Latn", "text"): 2,
        ("eng_Latn", "text"): 2,
    }
    assert (packer.stats.tokens, packer.stats.padding) == (17, 3)
    assert packer.stats.efficiency == pytest.approx(17 / 20)
    assert packer.stats.by_language_modality == {
        "eng_Latn/text": 8,
        "fra_Latn/text": 3,
        "fra_Latn/image": 6,
    }
    labels = stack_rows([first, second], packer)["labels"]
    # The token before the block's patches predicts nothing; the last patch predicts the end.
    assert labels[1].tolist() == [
        IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, with_block.tokens[6],
        with_block.tokens[7], with_block.tokens[8], IGNORE_INDEX, text.tokens[1], IGNORE_INDEX,
    ]  # fmt: skip
    assert labels[0][6] == IGNORE_INDEX  # a piece's last token is not trained on the padding


def test_block_of_exactly_seq_len_fills_a_row_of_its_own():
    document = make_document(0, 20, ((2, 18),))
    packer = make_packer([document], seq_len=16, seed=None)
    first, second, third = packer.next_row(), packer.next_row(), packer.next_row()
    np.testing.assert_array_equal(first.tokens[:2], document.tokens[:2])
    assert (first.tokens[2:] == PAD).all()
    np.testing.assert_array_equal(second.tokens, document.tokens[2:18])
    assert (second.document_ids == 0).all() and second.media == ["doc0/block0"]
    np.testing.assert_array_equal(third.tokens[:4], [*document.tokens[18:], *document.tokens[:2]])


def test_block_longer_than_a_row_raises_naming_the_document():
    packer = make_packer([make_document(0, 5), OVERSIZED], seq_len=16, seed=None)
    with pytest.raises(OversizedBlockError, match=r"synthetic\.jsonl:10: a media block of 17"):
        packer.next_row()


def test_block_longer_than_a_row_is_skipped_and_counted_and_the_stream_goes_on():
    before, after = make_document(0, 10), make_document(1, 6, lang="fra_Latn")
    packer = make_packer([before, OVERSIZED, after], seq_len=16, seed=None, skip_oversized=True)
    first = packer.next_row()
    np.testing.assert_array_equal(first.tokens, [*before.tokens, *after.tokens])
    assert first.document_ids.tolist() == [0] * 10 + [1] * 6
    assert first.media == []
    assert packer.stats.oversized_documents == 1
    second = packer.next_row()
    np.testing.assert_array_equal(second.tokens, first.tokens)
    assert packer.stats.oversized_documents == 2
    assert (packer.stats.tokens, packer.stats.padding) == (32, 0)


# --- labels, pieces, errors -------------------------------------------------------------------


def test_labels_ignore_piece_ends_padding_the_last_position_and_patch_targets():
    packer = make_packer(TEXT, 8)
    rows = np.array([[10, 11, PATCH, PATCH, 12, 20, PAD, PAD], [30, 31, 32, 33, 34, 35, 36, 37]])
    ids = np.array([[0, 0, 0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1]])
    ignore = IGNORE_INDEX
    assert packer.labels(rows, ids).tolist() == [
        [11, ignore, ignore, 12, ignore, ignore, ignore, ignore],
        [31, 32, ignore, 34, 35, 36, 37, ignore],
    ]


def test_stack_rows_stacks_the_rows_and_adds_their_labels():
    packer = make_packer(MIXED, 16)
    rows = [packer.next_row() for _ in range(5)]
    stacked = stack_rows(rows, packer)
    assert set(stacked) == {"tokens", "document_ids", "positions", "labels"}
    for name in ("tokens", "document_ids", "positions"):
        np.testing.assert_array_equal(stacked[name], np.stack([getattr(r, name) for r in rows]))
    expected = packer.labels(stacked["tokens"], stacked["document_ids"])
    np.testing.assert_array_equal(stacked["labels"], expected)


def test_long_document_continues_at_the_start_of_the_next_rows():
    docs = [make_document(0, 3), make_document(1, 35), make_document(2, 2)]
    packer = make_packer(docs, seq_len=8, seed=None)
    rows = [packer.next_row() for _ in range(5)]
    labels = stack_rows(rows, packer)["labels"]
    long_doc = docs[1].tokens
    # Row 0: [3 tokens | 5 of the long one]; rows 1-3 continue it; row 4: [last 6 | 2 tokens].
    assert rows[0].document_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert rows[0].positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert labels[0][2] == IGNORE_INDEX  # the first document must not predict the second
    for index in (1, 2, 3):
        assert (rows[index].document_ids == 0).all()
        assert rows[index].positions.tolist() == list(range(8))
        np.testing.assert_array_equal(rows[index].tokens, long_doc[5 + 8 * (index - 1) :][:8])
        assert labels[index][-1] == IGNORE_INDEX  # its continuation is in the next row
    np.testing.assert_array_equal(rows[4].tokens, [*long_doc[-6:], *docs[2].tokens])
    assert rows[4].positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert labels[4][5] == IGNORE_INDEX


def test_document_encoded_to_no_tokens_raises_naming_it():
    empty = EncodedDocument(np.zeros(0, dtype=np.int64), "eng_Latn", name="empty.jsonl:7")
    packer = make_packer([make_document(0, 3), empty], seq_len=8, seed=None)
    with pytest.raises(ValueError, match=r"empty\.jsonl:7: encoded to no tokens"):
        packer.next_row()


def test_same_document_object_returned_twice_in_a_row_makes_two_pieces():
    document = make_document(0, 5)

    class SameObjectSource(EpochSource):
        def next_document(self) -> EncodedDocument:
            super().next_document()
            return document

    packer = RowPacker(SameObjectSource([document]), 12, PAD, PATCH)
    row = packer.next_row()
    assert row.document_ids.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert row.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


# --- state_dict / load_state_dict ---------------------------------------------------------------


def source_epoch(state: dict) -> int:
    return (state["document_state"] or state["next_state"])["epoch"]


def test_restore_at_every_row_boundary_continues_bitwise_identically():
    documents = [*MIXED, OVERSIZED]
    seq_len, ahead = LONGEST_BLOCK, 4
    n_rows = 3 * sum(len(doc.tokens) for doc in MIXED) // seq_len
    reference = make_packer(documents, seq_len, skip_oversized=True)
    states, rows = [], []
    for _ in range(n_rows + ahead):
        states.append(reference.state_dict())
        rows.append(reference.next_row())
    states.append(reference.state_dict())
    kinds = set()
    for k in range(n_rows):
        state = states[k]
        if state["document_state"] is None:
            kinds.add("between documents")
        elif k and (rows[k - 1].tokens == PAD).any():
            kinds.add("before a block moved to this row")
        else:
            kinds.add("mid document")
        if source_epoch(states[k + 1]) > source_epoch(state):
            kinds.add("row crosses an epoch")
        if (
            k
            and state["stats"]["oversized_documents"]
            > states[k - 1]["stats"]["oversized_documents"]
        ):
            kinds.add("after a skipped oversized document")
        restored = make_packer(documents, seq_len, skip_oversized=True)
        for _ in range(3):  # a packer that has moved on must restore exactly too
            restored.next_row()
        restored.load_state_dict(json.loads(json.dumps(state)))
        assert restored.state_dict() == state
        for i in range(ahead):
            got, want = restored.next_row(), rows[k + i]
            for name in ("tokens", "document_ids", "positions"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), name)
            assert (got.media, got.token_counts) == (want.media, want.token_counts)
        assert restored.state_dict() == states[k + ahead]  # stats included
    assert kinds == {
        "between documents",
        "before a block moved to this row",
        "mid document",
        "row crosses an epoch",
        "after a skipped oversized document",
    }
    assert source_epoch(states[n_rows]) >= 2


def test_state_dict_is_small_and_survives_json():
    packer = make_packer(MIXED, LONGEST_BLOCK)
    for _ in range(7):
        packer.next_row()
    state = packer.state_dict()
    text = json.dumps(state)
    assert json.loads(text) == state
    assert len(text) < 400
    assert set(state) == {"document_state", "next_state", "offset", "stats"}
