"""Intervals and the paired test against independent values: published Wilson intervals, the
Wilson formula written out here, and the McNemar p-value by enumerating the binomial."""

import math

import pytest

from interventions.pipeline.stats import mcnemar, paired, proportion_ci, row_intervals

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_by_formula(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927) score interval, written out."""
    p = k / n
    centre = p + Z95 ** 2 / (2 * n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n))
    return (centre - half) / (1 + Z95 ** 2 / n), (centre + half) / (1 + Z95 ** 2 / n)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in
# Medicine 17:857-872, Table I, method 3 (score interval without continuity correction),
# printed to 4 decimals.
NEWCOMBE_WILSON = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                   (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}


@pytest.mark.parametrize("k, n", list(NEWCOMBE_WILSON))
def test_wilson_interval_matches_published_values(k, n):
    low, high = proportion_ci(k, n)
    want_low, want_high = NEWCOMBE_WILSON[(k, n)]
    assert abs(low - want_low) <= 5e-5 and abs(high - want_high) <= 5e-5  # printed rounding


@pytest.mark.parametrize("k, n", [(24, 26), (14, 26), (26, 36), (0, 7), (7, 7), (1, 2),
                                  (100, 200), (3, 1000)])
def test_wilson_interval_equals_the_formula(k, n):
    # Both sides are double precision; the formula's few operations keep 1e-12.
    assert proportion_ci(k, n) == pytest.approx(wilson_by_formula(k, n), abs=1e-12)


def test_undefined_proportion_has_no_interval():
    assert proportion_ci(0, 0) is None


def mcnemar_by_enumeration(b: int, c: int) -> float:
    """Exact two-sided McNemar: the probability, under Binomial(b + c, 1/2), of a split at
    least as uneven as the one seen (outcomes no more likely than it)."""
    n = b + c
    probability = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    seen = probability[b]
    return min(1.0, sum(q for q in probability if q <= seen * (1 + 1e-7)))


@pytest.mark.parametrize("b, c", [(1, 6), (0, 5), (10, 0), (3, 3), (7, 12), (0, 1), (25, 40)])
def test_mcnemar_equals_enumeration(b, c):
    assert mcnemar(b, c) == pytest.approx(mcnemar_by_enumeration(b, c), rel=1e-9)
    assert mcnemar(b, c) == pytest.approx(mcnemar(c, b), rel=1e-12)  # two-sided


def test_mcnemar_textbook_values():
    # 1 vs 6 discordant pairs: 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128.
    assert mcnemar(1, 6) == pytest.approx(0.125, rel=1e-12)
    # 0 vs 5: 2 / 2^5.
    assert mcnemar(0, 5) == pytest.approx(0.0625, rel=1e-12)
    assert mcnemar(0, 0) == 1.0


def test_paired_counts_discordant_prompts():
    first = [True, True, False, False, True, False, True]
    second = [True, False, True, False, False, False, True]
    result = paired(first, second)
    assert (result["n_only_first"], result["n_only_second"]) == (2, 1)
    assert result["p_value"] == pytest.approx(mcnemar_by_enumeration(2, 1))


def test_row_intervals_from_counts():
    # SmolLM2's AF1 configuration on the default task: 24 of the 26 prompts the full model
    # gets right (of 36), and AF1 right on 25 prompts in all (one the full model gets wrong).
    row = {"n_prompts": 36, "n_full_correct": 26, "n_af1_correct_of_full": 24,
           "n_af1_correct": 25}
    got = row_intervals(row)
    assert got["faithfulness_ci"] == pytest.approx(wilson_by_formula(24, 26), abs=1e-12)
    assert got["full_accuracy_ci"] == pytest.approx(wilson_by_formula(26, 36), abs=1e-12)
    assert got["af1_accuracy_ci"] == pytest.approx(wilson_by_formula(25, 36), abs=1e-12)
    assert got["ci_method"] == "wilson 95%"
    assert got["af1_vs_full"] == {"n_full_only": 2, "n_af1_only": 1,
                                  "p_value": pytest.approx(mcnemar_by_enumeration(2, 1))}
    assert row_intervals({**row, "n_full_correct": 0, "n_af1_correct_of_full": 0}
                         )["faithfulness_ci"] is None
