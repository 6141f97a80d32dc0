"""Language mixtures: how much of the token stream each of the ~200 languages gets.

Three ways to turn per-language token counts into target token shares, all returning a dict
`{code: weight}` that sums to 1 and has one entry per input language (weight 0 where a language
has no tokens):

- `natural`: proportional to size (temperature 1).
- `temperature`: p_l ∝ n_l^(1/T). T = 1 is natural, T -> inf uniform; the usual XLM-R/mT5 knob
  for up-sampling small languages.
- `unimax`: UniMax (Chung et al., 2023, "UniMax: Fairer and more effective language sampling for
  large-scale multilingual pretraining", Algorithm 1): as uniform as the training budget allows
  without repeating any language more than `max_epochs` times.

`MixtureSampler` then decides, document by document, which language comes next so that the
achieved TOKEN shares track the targets; `share_report` turns achieved vs target shares into
flat metric names for TensorBoard and metrics.jsonl.

Language codes are opaque strings here (FLORES-200 codes in practice); checking them against
`data.languages` is the job of whoever reads the sources.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

MIXTURE_KINDS = ("natural", "temperature", "unimax")


def _check_counts(tokens: Mapping[str, int], what: str) -> None:
    if not tokens:
        raise ValueError(f"{what}: no languages given (the token counts are empty)")
    for lang, n in tokens.items():
        if not (isinstance(n, (int, float, np.integer, np.floating)) and n >= 0 and n < math.inf):
            raise ValueError(
                f"{what}: token count of {lang!r} must be a finite number >= 0, got {n!r}"
            )
    if not any(n > 0 for n in tokens.values()):
        raise ValueError(f"{what}: every language has 0 tokens; nothing to sample from")


def temperature_weights(tokens: Mapping[str, int], temperature: float) -> dict[str, float]:
    """Target shares p_l ∝ n_l^(1/T) over the languages with n_l > 0; the others get 0.

    T = 1 is proportional to size, larger T flattens towards uniform (T = inf is exactly uniform
    over the non-empty languages), T < 1 sharpens towards the largest language. Computed in log
    space so that huge counts with small T do not overflow.
    """
    if not (temperature > 0):  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_counts(tokens, "temperature_weights")
    present = {lang: n for lang, n in tokens.items() if n > 0}
    logits = np.array([math.log(n) for n in present.values()], dtype=np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    by_lang = dict(zip(present, probs.tolist(), strict=True))
    return {lang: by_lang.get(lang, 0.0) for lang in tokens}


def unimax_weights(
    tokens: Mapping[str, int], budget_tokens: int, max_epochs: float
) -> dict[str, float]:
    """UniMax target shares (Chung et al., 2023, Algorithm 1) for a budget of `budget_tokens`.

    Languages are visited from smallest to largest. Each gets the uniform share of the budget
    still unallocated, `remaining / languages_left`, capped at `max_epochs * n_l` tokens; what a
    capped language does not take flows on to the larger languages. Weight = allocated tokens /
    total allocated. The result is uniform over every language large enough to absorb its share,
    and each small language is repeated exactly `max_epochs` times.

    Ties in size are visited in code order: the sort key is `(tokens, code)`, so the result does
    not depend on the order of the mapping. (Equal sizes get equal allocations in either order;
    the key only fixes the order of the floating-point arithmetic.)

    Budget larger than `max_epochs * sum(n_l)`: the budget cannot be spent without exceeding the
    cap, and then every language is at its cap (once one language is below its cap, all larger
    ones are too). As in the paper's final normalisation, the weights are then the caps
    normalised, i.e. proportional to size: every language is repeated the same
    `budget_tokens / sum(n_l)` > `max_epochs` times. A `UserWarning` says so, with that number.
    """
    if not (isinstance(budget_tokens, (int, np.integer)) and budget_tokens > 0):
        raise ValueError(f"unimax budget_tokens must be a positive integer, got {budget_tokens!r}")
    if not (max_epochs > 0):  # also rejects NaN
        raise ValueError(f"unimax max_epochs must be > 0, got {max_epochs!r}")
    _check_counts(tokens, "unimax_weights")

    order = sorted(tokens, key=lambda lang: (tokens[lang], lang))
    remaining = float(budget_tokens)
    allocated: dict[str, float] = {}
    for i, lang in enumerate(order):
        uniform_share = remaining / (len(order) - i)
        allocated[lang] = min(uniform_share, max_epochs * float(tokens[lang]))
        remaining -= allocated[lang]

    total = sum(allocated.values())
    if remaining > 1e-9 * budget_tokens:
        corpus = sum(float(n) for n in tokens.values())
        warnings.warn(
            f"unimax: budget_tokens = {budget_tokens} exceeds max_epochs ({max_epochs}) x the "
            f"{corpus:.0f} tokens available; falling back to proportional weights, every "
            f"language repeated {budget_tokens / corpus:.3g} times",
            UserWarning,
            stacklevel=2,
        )
    return {lang: allocated[lang] / total for lang in tokens}


def mixture_from_config(
    kind: str,
    tokens: Mapping[str, int],
    *,
    temperature: float,
    budget_tokens: int,
    max_epochs: float,
) -> dict[str, float]:
    """The target shares the config asks for: `data.mixture` = natural | temperature | unimax."""
    if kind == "natural":
        return temperature_weights(tokens, 1.0)
    if kind == "temperature":
        return temperature_weights(tokens, temperature)
    if kind == "unimax":
        return unimax_weights(tokens, budget_tokens, max_epochs)
    raise ValueError(f"data.mixture must be one of {', '.join(MIXTURE_KINDS)}; got {kind!r}")


class MixtureSampler:
    """Deterministically picks the language of the next document so token shares hit targets.

    Rule: pick the language with the largest deficit `target_l * (total + 1) - emitted_l`, where
    `emitted_l` are the tokens already emitted for l and `total` their sum (ties go to the
    first code in sorted order); the caller then reports the chosen document's length with
    `record(lang, n_tokens)`. `next_language()` changes nothing, so calling it twice without a
    `record` gives the same answer. Targets are the given weights normalised to sum 1; a
    language with weight 0 is never picked.

    Why a deficit rule rather than random draws with probability target_l:
    - Exact resume needs no RNG state. The decision is a function of the emitted counts alone,
      so `state_dict()` is just those counts, small and JSON-serialisable; every rank computing
      the same stream makes the same choices, and a restart continues the identical sequence.
    - The error does not grow with the stream. A language is only picked while it is behind
      (the deficits sum to 1, so the largest is > 0), hence no language ever runs ahead of its
      target by more than one document, and since the deficits sum to 1 none falls behind by
      more than (languages - 1) documents; in practice both stay within about one document. The
      share error after N tokens is therefore O(longest document / N), where independent draws
      of documents leave a share error that shrinks only like 1/sqrt(N) (and, on a short run,
      can starve a 0.01% language entirely or hand it ten times its share).
    """

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("MixtureSampler: no languages given (the weights are empty)")
        for lang, w in weights.items():
            if not (w >= 0 and w < math.inf):
                raise ValueError(
                    f"MixtureSampler: weight of {lang!r} must be finite >= 0, got {w!r}"
                )
        total = math.fsum(float(w) for w in weights.values())
        if total <= 0:
            raise ValueError("MixtureSampler: every language has weight 0; nothing to sample")
        self.languages: tuple[str, ...] = tuple(sorted(weights))
        self._index = {lang: i for i, lang in enumerate(self.languages)}
        self._targets = np.array([weights[lang] / total for lang in self.languages], np.float64)
        self._never = self._targets == 0
        self._emitted = np.zeros(len(self.languages), dtype=np.int64)
        self._total = 0

    @property
    def targets(self) -> dict[str, float]:
        """The normalised target shares, by code."""
        return dict(zip(self.languages, self._targets.tolist(), strict=True))

    def next_language(self) -> str:
        deficit = self._targets * float(self._total + 1) - self._emitted
        deficit[self._never] = -np.inf
        return self.languages[int(np.argmax(deficit))]  # argmax: first maximum = code order

    def record(self, lang: str, n_tokens: int) -> None:
        """Count `n_tokens` emitted for `lang` (normally the language just returned)."""
        if lang not in self._index:
            raise KeyError(f"MixtureSampler.record: language {lang!r} is not in the mixture")
        if n_tokens < 0:
            raise ValueError(f"MixtureSampler.record: n_tokens must be >= 0, got {n_tokens}")
        self._emitted[self._index[lang]] += int(n_tokens)
        self._total += int(n_tokens)

    def achieved_shares(self) -> dict[str, float]:
        """Emitted tokens per language / all emitted tokens (all 0.0 before any token)."""
        denom = max(self._total, 1)
        return {lang: int(n) / denom for lang, n in zip(self.languages, self._emitted, strict=True)}

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {
            "emitted_tokens": {
                lang: int(n) for lang, n in zip(self.languages, self._emitted, strict=True)
            }
        }

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        """Restore emitted counts. A mixture language absent from `state` starts at 0 (it was
        added on resume); a language in `state` but not in the mixture is an error, since its
        tokens would silently drop out of the accounting."""
        if "emitted_tokens" not in state:
            raise KeyError("MixtureSampler.load_state_dict: state has no 'emitted_tokens'")
        emitted = np.zeros(len(self.languages), dtype=np.int64)
        for lang, n in state["emitted_tokens"].items():
            if lang not in self._index:
                raise KeyError(
                    f"MixtureSampler.load_state_dict: language {lang!r} in the saved state is not "
                    f"in the mixture ({len(self.languages)} languages)"
                )
            if not (isinstance(n, (int, np.integer)) and n >= 0):
                raise ValueError(
                    f"MixtureSampler.load_state_dict: emitted tokens of {lang!r} must be an "
                    f"integer >= 0, got {n!r}"
                )
            emitted[self._index[lang]] = int(n)
        self._emitted = emitted
        self._total = int(emitted.sum())


def share_report(achieved: Mapping[str, float], target: Mapping[str, float]) -> dict[str, float]:
    """Flat metrics: `data/lang/<code>/share`, `data/lang/<code>/target` for every language in
    either mapping (a missing side counts as 0), and `data/lang/max_abs_error`, the largest
    |share - target|."""
    report: dict[str, float] = {}
    max_abs_error = 0.0
    for lang in sorted(set(achieved) | set(target)):
        share, goal = float(achieved.get(lang, 0.0)), float(target.get(lang, 0.0))
        report[f"data/lang/{lang}/share"] = share
        report[f"data/lang/{lang}/target"] = goal
        max_abs_error = max(max_abs_error, abs(share - goal))
    report["data/lang/max_abs_error"] = max_abs_error
    return report
