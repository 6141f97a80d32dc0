import json
import math
import warnings

import numpy as np
import pytest

from data.languages import LANGUAGES
from data.mixture import (
    MixtureSampler,
    mixture_from_config,
    share_report,
    temperature_weights,
    unimax_weights,
)

LONGEST_DOCUMENT = 256


def skewed_counts(seed: int = 0) -> dict[str, int]:
    """Zipf-like token counts over the 204 FLORES-200 codes: largest ~30%, smallest ~0.03%."""
    order = np.random.default_rng(seed).permutation(list(LANGUAGES))
    return {str(code): int(1e10 / (rank + 1) ** 1.3) for rank, code in enumerate(order)}


def entropy(weights: dict[str, float]) -> float:
    return -sum(p * math.log(p) for p in weights.values() if p > 0)


# --- temperature ------------------------------------------------------------------------------


def test_temperature_one_is_proportional() -> None:
    counts = {"a": 10, "b": 30, "c": 60}
    assert temperature_weights(counts, 1.0) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert mixture_from_config(
        "natural", counts, temperature=7.0, budget_tokens=1, max_epochs=1.0
    ) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})


def test_temperature_large_is_nearly_uniform_and_inf_exactly() -> None:
    counts = skewed_counts()
    uniform = 1 / len(counts)
    assert max(abs(p - uniform) for p in temperature_weights(counts, 1e4).values()) < 1e-5
    assert list(temperature_weights(counts, math.inf).values()) == [uniform] * len(counts)


def test_temperature_square_root_and_monotone_in_t() -> None:
    assert temperature_weights({"a": 1, "b": 4}, 2.0) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    counts = skewed_counts()
    small, large = min(counts, key=counts.get), max(counts, key=counts.get)
    mixes = [temperature_weights(counts, t) for t in (0.5, 1.0, 2.0, 3.3, 10.0, 100.0)]
    for flatter, sharper in zip(mixes[1:], mixes[:-1], strict=True):
        assert entropy(flatter) > entropy(sharper)
        assert flatter[small] > sharper[small]
        assert flatter[large] < sharper[large]
    for mix in mixes:
        assert math.fsum(mix.values()) == pytest.approx(1.0, abs=1e-12)


def test_temperature_zero_counts_and_no_overflow() -> None:
    weights = temperature_weights({"a": 0, "b": 10**15, "c": 10**14}, 0.01)
    assert list(weights) == ["a", "b", "c"]
    assert weights["a"] == 0.0
    assert weights["b"] == pytest.approx(1.0) and weights["c"] < 1e-90


@pytest.mark.parametrize(
    ("counts", "temperature", "message"),
    [
        ({"a": 1}, 0.0, "temperature must be > 0"),
        ({"a": 1}, -1.0, "temperature must be > 0"),
        ({"a": 1}, math.nan, "temperature must be > 0"),
        ({}, 1.0, "empty"),
        ({"a": 0, "b": 0}, 1.0, "every language has 0 tokens"),
        ({"a": 5, "b": -1}, 1.0, "'b'"),
    ],
)
def test_temperature_errors(counts, temperature, message) -> None:
    with pytest.raises(ValueError, match=message):
        temperature_weights(counts, temperature)


# --- UniMax -----------------------------------------------------------------------------------


def test_unimax_hand_example() -> None:
    """Sizes {a: 10, b: 100, c: 1000}, budget 600, max_epochs 2, visited smallest first:

    a: uniform share 600 / 3 = 200, cap 2 * 10 = 20     -> 20,  remaining 580
    b: uniform share 580 / 2 = 290, cap 2 * 100 = 200   -> 200, remaining 380
    c: uniform share 380 / 1 = 380, cap 2 * 1000 = 2000 -> 380, remaining 0
    weights = (20, 200, 380) / 600 = (1/30, 1/3, 19/30).
    """
    weights = unimax_weights({"c": 1000, "a": 10, "b": 100}, 600, 2.0)
    assert weights == pytest.approx({"a": 1 / 30, "b": 1 / 3, "c": 19 / 30}, rel=1e-12)
    assert list(weights) == ["c", "a", "b"]  # the caller's order is kept
    assert mixture_from_config(
        "unimax", {"a": 10, "b": 100, "c": 1000}, temperature=1.0, budget_tokens=600, max_epochs=2
    ) == pytest.approx(weights)


def test_unimax_uniform_when_nothing_is_capped() -> None:
    assert unimax_weights({"a": 10, "b": 100, "c": 1000}, 30, 1.0) == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    )


@pytest.mark.parametrize("budget", [10**9, 10**10, 3 * 10**10])
@pytest.mark.parametrize("max_epochs", [1.0, 4.0])
def test_unimax_respects_caps_and_is_uniform_above_them(budget: int, max_epochs: float) -> None:
    counts = skewed_counts(seed=1) | {"zzz_Zero": 0}
    assert budget <= max_epochs * sum(counts.values())  # the budget can be spent within the caps
    weights = unimax_weights(counts, budget, max_epochs)
    assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert weights["zzz_Zero"] == 0.0
    allocated = {lang: w * budget for lang, w in weights.items()}
    for lang, tokens in allocated.items():
        assert tokens <= max_epochs * counts[lang] * (1 + 1e-9), lang
    # UniMax: every language below its cap gets the same share, at least that of any capped one.
    uncapped = [t for lang, t in allocated.items() if t < max_epochs * counts[lang] * (1 - 1e-9)]
    assert uncapped, "the largest language always absorbs the leftover budget"
    assert max(uncapped) == pytest.approx(min(uncapped), rel=1e-9)
    assert max(allocated.values()) == pytest.approx(max(uncapped), rel=1e-9)


def test_unimax_budget_beyond_caps_falls_back_to_proportional_with_warning() -> None:
    """Caps 20 + 200 + 2000 = 2220 < 3000: every language is capped, so the budget can only be
    spent by repeating all of them equally often, 3000 / 1110 = 2.7 epochs > max_epochs = 2."""
    counts = {"a": 10, "b": 100, "c": 1000}
    with pytest.warns(UserWarning, match=r"repeated 2\.7 times"):
        weights = unimax_weights(counts, 3000, 2.0)
    assert weights == pytest.approx({lang: n / 1110 for lang, n in counts.items()})
    with warnings.catch_warnings():  # exactly at the caps: no warning, same answer
        warnings.simplefilter("error")
        assert unimax_weights(counts, 2220, 2.0) == pytest.approx(weights)


def test_unimax_ties_do_not_depend_on_mapping_order() -> None:
    counts = {"d": 50, "b": 5, "a": 5, "c": 50}
    reordered = dict(reversed(list(counts.items())))
    expected = unimax_weights(counts, 100, 3.0)
    # a, b capped at 15 each; c, d share the remaining 70.
    assert expected == pytest.approx({"a": 0.15, "b": 0.15, "c": 0.35, "d": 0.35})
    assert unimax_weights(reordered, 100, 3.0) == expected


@pytest.mark.parametrize(
    ("counts", "budget", "max_epochs", "message"),
    [
        ({"a": 1}, 0, 1.0, "budget_tokens must be a positive integer"),
        ({"a": 1}, 10.5, 1.0, "budget_tokens must be a positive integer"),
        ({"a": 1}, 10, 0.0, "max_epochs must be > 0"),
        ({"a": 1}, 10, math.nan, "max_epochs must be > 0"),
        ({}, 10, 1.0, "empty"),
        ({"a": 0}, 10, 1.0, "every language has 0 tokens"),
        ({"a": math.inf}, 10, 1.0, "'a'"),
    ],
)
def test_unimax_errors(counts, budget, max_epochs, message) -> None:
    with pytest.raises(ValueError, match=message):
        unimax_weights(counts, budget, max_epochs)


def test_mixture_from_config_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"data\.mixture .*natural, temperature, unimax.*'uni'"):
        mixture_from_config("uni", {"a": 1}, temperature=1.0, budget_tokens=1, max_epochs=1.0)


def test_mixture_from_config_temperature() -> None:
    counts = skewed_counts()
    assert mixture_from_config(
        "temperature", counts, temperature=3.3, budget_tokens=1, max_epochs=1.0
    ) == temperature_weights(counts, 3.3)


# --- MixtureSampler ---------------------------------------------------------------------------


class Documents:
    """Seeded document lengths per language (each language has its own mean length), indexed by
    how many documents of that language were taken so far, so a test can replay the stream."""

    def __init__(self, languages, seed: int = 0, per_language: int = 4096):
        rng = np.random.default_rng(seed)
        self.lengths = {}
        for lang in languages:
            mean = int(rng.integers(10, 150))
            lengths = rng.integers(1, 2 * mean, size=per_language)
            self.lengths[lang] = np.minimum(lengths, LONGEST_DOCUMENT).tolist()
        self.taken = dict.fromkeys(languages, 0)

    def take(self, lang: str) -> int:
        n = self.lengths[lang][self.taken[lang]]
        self.taken[lang] += 1
        return n


def run(sampler: MixtureSampler, docs: Documents, steps: int) -> list[str]:
    picked = []
    for _ in range(steps):
        lang = sampler.next_language()
        sampler.record(lang, docs.take(lang))
        picked.append(lang)
    return picked


@pytest.mark.parametrize("kind", ["natural", "temperature", "unimax"])
def test_sampler_token_shares_converge_like_one_over_n(kind: str) -> None:
    counts = skewed_counts(seed=2)
    target = mixture_from_config(
        kind, counts, temperature=3.3, budget_tokens=10**11, max_epochs=4.0
    )
    assert max(target.values()) > 8 * min(target.values())  # skewed
    sampler = MixtureSampler(target)
    docs = Documents(sampler.languages, seed=3)
    p = np.array([target[lang] for lang in sampler.languages])
    checkpoints, errors = [25_000, 50_000, 100_000, 200_000], {}
    total = 0
    while checkpoints:
        lang = sampler.next_language()
        n = docs.take(lang)
        sampler.record(lang, n)
        total += n
        # No language ever runs ahead of its target by a document or more.
        emitted = np.array(list(sampler.state_dict()["emitted_tokens"].values()))
        assert (emitted - p * total).max() < LONGEST_DOCUMENT
        if total >= checkpoints[0]:
            report = share_report(sampler.achieved_shares(), target)
            errors[checkpoints.pop(0)] = report["data/lang/max_abs_error"]
    assert errors[200_000] < 0.002, errors
    # The error is bounded in tokens (not in share), so the share error falls like 1/N.
    for n_tokens, error in errors.items():
        assert error * n_tokens < 2 * LONGEST_DOCUMENT, errors


def test_sampler_state_round_trip_continues_identically() -> None:
    target = temperature_weights(skewed_counts(seed=4), 2.0)
    sampler = MixtureSampler(target)
    docs = Documents(sampler.languages, seed=5)
    run(sampler, docs, 700)

    state = json.loads(json.dumps(sampler.state_dict()))
    assert set(state) == {"emitted_tokens"}
    assert len(json.dumps(state)) < 20 * len(target) + 50  # a few bytes per language
    resumed = MixtureSampler(dict(reversed(list(target.items()))))  # mapping order is irrelevant
    resumed.load_state_dict(state)
    resumed_docs = Documents(sampler.languages, seed=5)
    resumed_docs.taken = dict(docs.taken)

    assert run(resumed, resumed_docs, 700) == run(sampler, docs, 700)
    assert resumed.state_dict() == sampler.state_dict()
    assert resumed.achieved_shares() == sampler.achieved_shares()


def test_sampler_state_missing_language_starts_at_zero() -> None:
    sampler = MixtureSampler({"a": 0.5, "b": 0.5})
    sampler.load_state_dict({"emitted_tokens": {"a": 10}})
    assert sampler.state_dict() == {"emitted_tokens": {"a": 10, "b": 0}}
    assert sampler.next_language() == "b"


def test_sampler_zero_weight_never_picked() -> None:
    sampler = MixtureSampler({"a": 0.0, "b": 0.7, "c": 0.3, "d": 0.0})
    picked = set(run(sampler, Documents(sampler.languages), 2000))
    assert picked == {"b", "c"}
    assert sampler.achieved_shares()["a"] == 0.0
    assert sampler.targets == {"a": 0.0, "b": 0.7, "c": 0.3, "d": 0.0}


def test_sampler_ties_go_in_code_order_and_next_is_pure() -> None:
    sampler = MixtureSampler({"c": 1.0, "a": 1.0, "b": 1.0})  # normalised to 1/3 each
    assert sampler.achieved_shares() == {"a": 0.0, "b": 0.0, "c": 0.0}
    picked = []
    for _ in range(6):
        lang = sampler.next_language()
        assert sampler.next_language() == lang  # no side effect until record()
        sampler.record(lang, 10)
        picked.append(lang)
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_sampler_follows_tokens_not_documents() -> None:
    """Equal targets, but a's documents are 9x longer: b must get ~9x as many documents."""
    sampler = MixtureSampler({"a": 0.5, "b": 0.5})
    picked = []
    for _ in range(1000):
        lang = sampler.next_language()
        sampler.record(lang, 90 if lang == "a" else 10)
        picked.append(lang)
    assert picked.count("b") == pytest.approx(9 * picked.count("a"), abs=10)
    assert sampler.achieved_shares()["a"] == pytest.approx(0.5, abs=90 / 18_000)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "empty"),
        ({"a": 0.0, "b": 0.0}, "every language has weight 0"),
        ({"a": 1.0, "b": -0.1}, "'b'"),
        ({"a": 1.0, "b": math.nan}, "'b'"),
    ],
)
def test_sampler_rejects_bad_weights(weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        MixtureSampler(weights)


def test_sampler_errors() -> None:
    sampler = MixtureSampler({"eng_Latn": 0.9, "yor_Latn": 0.1})
    with pytest.raises(KeyError, match="'fra_Latn' is not in the mixture"):
        sampler.record("fra_Latn", 3)
    with pytest.raises(ValueError, match="n_tokens must be >= 0"):
        sampler.record("eng_Latn", -1)
    with pytest.raises(KeyError, match="'fra_Latn' in the saved state is not in the mixture"):
        sampler.load_state_dict({"emitted_tokens": {"eng_Latn": 5, "fra_Latn": 3}})
    with pytest.raises(ValueError, match="'yor_Latn' must be an integer >= 0"):
        sampler.load_state_dict({"emitted_tokens": {"yor_Latn": -2}})
    with pytest.raises(KeyError, match="emitted_tokens"):
        sampler.load_state_dict({})
    assert sampler.state_dict() == {"emitted_tokens": {"eng_Latn": 0, "yor_Latn": 0}}


# --- share_report -----------------------------------------------------------------------------


def test_share_report() -> None:
    report = share_report({"eng_Latn": 0.61, "yor_Latn": 0.39}, {"eng_Latn": 0.6, "zul_Latn": 0.4})
    assert report == pytest.approx(
        {
            "data/lang/eng_Latn/share": 0.61,
            "data/lang/eng_Latn/target": 0.6,
            "data/lang/yor_Latn/share": 0.39,
            "data/lang/yor_Latn/target": 0.0,
            "data/lang/zul_Latn/share": 0.0,
            "data/lang/zul_Latn/target": 0.4,
            "data/lang/max_abs_error": 0.4,
        }
    )
    assert all(isinstance(v, float) for v in report.values())
    assert share_report({}, {}) == {"data/lang/max_abs_error": 0.0}
