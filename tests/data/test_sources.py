"""ShuffledSource and MixtureSource (data/sources.py): seeded, resumable document streams."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.mixture import MixtureSampler
from data.packing import EncodedDocument
from data.sources import BadDocument, ExhaustedStream, MixtureSource, ShuffledSource

SEED = 99


def document(lang: str, index: int, length: int) -> EncodedDocument:
    return EncodedDocument(np.arange(length, dtype=np.int64), lang, name=f"{lang}:{index}")


class Encoder:
    """Records every index it is asked for; raises BadDocument for the `bad` ones."""

    def __init__(
        self, lengths: dict[str, list[int]], bad: dict[tuple[str, int], str] | None = None
    ):
        self.lengths, self.bad = lengths, bad or {}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, lang: str, index: int) -> EncodedDocument:
        self.calls.append((lang, index))
        if (lang, index) in self.bad:
            raise BadDocument(f"{lang}:{index}", self.bad[lang, index], "made bad by the test")
        return document(lang, index, self.lengths[lang][index])


def permutation(n: int, seed: int, stream: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, stream, epoch]).permutation(n).tolist()


def shuffled(n: int, seed: int = SEED, stream: int = 0, **kwargs) -> tuple[ShuffledSource, list]:
    visited: list[int] = []

    def encode(index: int) -> EncodedDocument:
        visited.append(index)
        return document("eng_Latn", index, 1 + index)

    return ShuffledSource(n, encode, seed, stream, **kwargs), visited


# --- ShuffledSource -----------------------------------------------------------------------------


def test_shuffled_source_visits_each_epoch_in_the_permutation_of_seed_stream_and_epoch():
    source, visited = shuffled(7, stream=3)
    returned = [source.next_document().name for _ in range(4 * 7 + 2)]
    expected = [i for e in range(5) for i in permutation(7, SEED, 3, e)][: 4 * 7 + 2]
    assert visited == expected
    assert returned == [f"eng_Latn:{i}" for i in expected]
    assert (source.epoch, source.cursor) == (4, 2)
    epochs = [permutation(7, SEED, 3, e) for e in range(4)]
    assert len({tuple(p) for p in epochs}) == 4  # so the epoch boundaries above are tested


def test_shuffled_sources_differ_by_seed_and_by_stream():
    orders = {}
    for seed, stream in ((SEED, 0), (SEED, 1), (SEED + 1, 0)):
        source, visited = shuffled(10, seed, stream)
        for _ in range(10):
            source.next_document()
        assert sorted(visited) == list(range(10))
        orders[seed, stream] = tuple(visited)
    assert len(set(orders.values())) == 3


def test_shuffled_source_needs_a_document():
    with pytest.raises(ValueError, match="at least one document"):
        shuffled(0)


def test_shuffled_source_state_round_trip_continues_identically_across_epochs():
    reference, visited = shuffled(5)
    states = []
    for _ in range(13):
        states.append(reference.state_dict())
        reference.next_document()
    for k, state in enumerate(states):
        restored, restored_visited = shuffled(5)
        restored.next_document()
        restored.load_state_dict(json.loads(json.dumps(state)))
        for _ in range(13 - k):
            restored.next_document()
        assert restored_visited[1:] == visited[k:]
        assert restored.state_dict() == reference.state_dict()


def test_shuffled_source_refuses_a_state_of_another_document_count():
    source, _ = shuffled(5)
    source.next_document()
    other, _ = shuffled(6)
    with pytest.raises(ValueError, match="n_documents=5"):
        other.load_state_dict(source.state_dict())


def test_bad_document_raises_unless_skipped_then_counted_by_reason():
    lengths = {"eng_Latn": [3] * 6}
    bad = {("eng_Latn", 1): "bad_image", ("eng_Latn", 4): "unknown_language"}
    order = permutation(6, SEED, 0, 0)
    first_bad = min(order.index(1), order.index(4))
    strict = ShuffledSource(6, lambda i: Encoder(lengths, bad)("eng_Latn", i), SEED)
    for _ in range(first_bad):
        strict.next_document()
    with pytest.raises(BadDocument, match="made bad by the test") as raised:
        strict.next_document()
    assert raised.value.reason == bad["eng_Latn", order[first_bad]]

    encoder = Encoder(lengths, bad)
    skipped: dict[str, int] = {"already": 5}  # a shared dict: counts add up across sources
    source = ShuffledSource(
        6, lambda i: encoder("eng_Latn", i), SEED, skip_bad=True, skipped=skipped
    )
    returned = [source.next_document().name for _ in range(4 * 2)]  # two epochs of good ones
    good = [i for e in range(2) for i in permutation(6, SEED, 0, e) if i not in (1, 4)]
    assert returned == [f"eng_Latn:{i}" for i in good]
    bad_visits = [i for _, i in encoder.calls if i in (1, 4)]
    assert source.skipped is skipped
    assert skipped == {
        "already": 5,
        "bad_image": bad_visits.count(1),
        "unknown_language": bad_visits.count(4),
    }
    assert bad_visits.count(1) >= 1 and bad_visits.count(4) >= 1


def test_stream_of_only_bad_documents_raises_instead_of_looping():
    encoder = Encoder({"eng_Latn": [1, 1, 1]}, {("eng_Latn", i): "bad_image" for i in range(3)})
    source = ShuffledSource(3, lambda i: encoder("eng_Latn", i), SEED, skip_bad=True)
    with pytest.raises(ExhaustedStream, match="every document of stream 0 is bad"):
        source.next_document()


def test_skip_bad_keeps_a_stream_going_while_any_document_is_good():
    for seed in range(6):
        encoder = Encoder({"eng_Latn": [2, 2, 2]}, {("eng_Latn", 1): "x", ("eng_Latn", 2): "x"})
        source = ShuffledSource(3, lambda i, e=encoder: e("eng_Latn", i), seed, skip_bad=True)
        names = [source.next_document().name for _ in range(10)]
        assert names == ["eng_Latn:0"] * 10, f"seed {seed}"


# --- MixtureSource ------------------------------------------------------------------------------

LENGTHS = {
    "eng_Latn": [40, 5, 17, 90, 3, 28, 61, 12],
    "fra_Latn": [33, 7, 50, 21, 14],
    "yor_Latn": [9, 70, 4],
    "zho_Hans": [11, 25, 6, 44],
}
WEIGHTS = {"eng_Latn": 0.5, "fra_Latn": 0.3, "yor_Latn": 0.2, "zho_Hans": 0.0}


def mixture(bad=None, skip_bad=False, lengths=LENGTHS, weights=WEIGHTS):
    encoder = Encoder(lengths, bad or {})
    counts = {lang: len(docs) for lang, docs in lengths.items()}
    return MixtureSource(counts, encoder, weights, SEED, skip_bad=skip_bad), encoder


def test_mixture_picks_languages_as_mixture_sampler_does_and_token_shares_converge():
    source, encoder = mixture()
    drawn = [source.next_document() for _ in range(400)]
    reference = MixtureSampler(WEIGHTS)
    emitted = dict.fromkeys(WEIGHTS, 0)
    for doc in drawn:
        assert doc.lang == reference.next_language()
        reference.record(doc.lang, len(doc.tokens))
        emitted[doc.lang] += len(doc.tokens)
    total = sum(emitted.values())
    longest = max(max(lengths) for lengths in LENGTHS.values())
    for lang, weight in WEIGHTS.items():
        assert abs(emitted[lang] / total - weight) <= 2 * longest / total, lang
    assert emitted["zho_Hans"] == 0 and "zho_Hans" not in source.streams
    assert source.sampler.achieved_shares() == pytest.approx(
        {lang: n / total for lang, n in emitted.items()}
    )


def test_mixture_streams_are_shuffled_per_language_with_a_stream_number_per_language():
    source, encoder = mixture()
    for _ in range(120):
        source.next_document()
    # Streams are numbered over the sorted languages, zero-weight ones included.
    for stream, lang in enumerate(sorted(LENGTHS)):
        indices = [i for code, i in encoder.calls if code == lang]
        n = len(LENGTHS[lang])
        expected = [
            i for e in range(len(indices) // n + 1) for i in permutation(n, SEED, stream, e)
        ]
        assert indices == expected[: len(indices)], lang
        assert len(indices) > n or lang == "zho_Hans", "every used stream wraps an epoch"


def test_mixture_state_round_trip_continues_identically():
    reference, _ = mixture()
    for _ in range(37):
        reference.next_document()
    state = json.loads(json.dumps(reference.state_dict()))
    expected = [reference.next_document().name for _ in range(50)]
    restored, _ = mixture()
    for _ in range(11):
        restored.next_document()
    restored.load_state_dict(state)
    assert [restored.next_document().name for _ in range(50)] == expected
    assert restored.state_dict() == reference.state_dict()
    assert len(json.dumps(state)) < 1000


def test_mixture_counts_bad_documents_of_every_language_in_one_dict_kept_in_its_state():
    bad = {("eng_Latn", 3): "bad_image", ("fra_Latn", 2): "bad_image", ("yor_Latn", 0): "bad_video"}
    strict, _ = mixture(bad)
    with pytest.raises(BadDocument, match="made bad by the test"):
        for _ in range(100):
            strict.next_document()
    reference, encoder = mixture(bad, skip_bad=True)
    for _ in range(60):
        reference.next_document()
    visits = [call for call in encoder.calls if call in bad]
    expected = {
        "bad_image": sum(call[0] != "yor_Latn" for call in visits),
        "bad_video": sum(call[0] == "yor_Latn" for call in visits),
    }
    assert reference.skipped == expected and all(expected.values())
    assert all(stream.skipped is reference.skipped for stream in reference.streams.values())
    state = json.loads(json.dumps(reference.state_dict()))
    assert state["skipped"] == expected
    continuation = [reference.next_document().name for _ in range(30)]
    restored, _ = mixture(bad, skip_bad=True)
    restored.next_document()
    restored.load_state_dict(state)
    assert restored.skipped == expected
    assert [restored.next_document().name for _ in range(30)] == continuation
    assert restored.skipped == reference.skipped


def test_mixture_refuses_weights_for_languages_without_documents():
    with pytest.raises(ValueError, match=r"languages without documents: \['tur_Latn'\]"):
        mixture(weights={**WEIGHTS, "tur_Latn": 0.1})


def test_mixture_refuses_a_state_of_a_language_with_another_document_count():
    source, _ = mixture()
    source.next_document()
    state = source.state_dict()
    fewer = {**LENGTHS, "fra_Latn": LENGTHS["fra_Latn"][:-1]}
    other, _ = mixture(lengths=fewer)
    with pytest.raises(ValueError, match="n_documents=5"):
        other.load_state_dict(state)


def test_mixture_refuses_a_state_without_a_stream_it_needs():
    source, _ = mixture(weights={"eng_Latn": 1.0})
    state = source.state_dict()
    other, _ = mixture()
    with pytest.raises(ValueError, match="no stream for languages"):
        other.load_state_dict(state)


def test_a_language_with_only_bad_documents_is_dropped_and_the_drop_survives_a_resume():
    all_bad = {("fra_Latn", i): "bad_image" for i in range(len(LENGTHS["fra_Latn"]))}
    source, _ = mixture(bad=all_bad, skip_bad=True)
    langs = [source.next_document().lang for _ in range(30)]
    assert "fra_Latn" not in langs and source.dropped == ["fra_Latn"]
    assert source.skipped["language_without_usable_documents"] == 1
    state = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_document().tokens.tolist() for _ in range(20)]
    restored, _ = mixture(bad=all_bad, skip_bad=True)
    restored.load_state_dict(state)
    assert [restored.next_document().tokens.tolist() for _ in range(20)] == expected
    with pytest.raises(BadDocument):  # without skipping, the first bad document raises
        strict, _ = mixture(bad=all_bad, skip_bad=False)
        [strict.next_document() for _ in range(30)]
