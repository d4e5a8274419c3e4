"""How sure a number is: 95% intervals for proportions and means, and the paired (McNemar) test.

Every share in ``results.jsonl`` (faithfulness, full and AF1 accuracy) is a count out of a few
dozen prompts, so it is reported with a 95% Wilson score interval. Two variants run on the same
prompts are compared with the exact McNemar test: a binomial test on the discordant pairs.
Both come from :func:`scipy.stats.binomtest`. Means over prompts (answer probabilities, KL
divergences) get a seeded percentile bootstrap interval over prompts (:func:`bootstrap_means`).
Nothing here imports torch (figures use it too).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CI_METHOD = "wilson"
CI_LEVEL = 0.95
PAIRED_TEST = "mcnemar-exact"
# Resamples of the bootstrap over prompts: the 2.5% and 97.5% percentiles of 1000 resampled
# means move by about 0.1 standard errors between seeds, small next to the interval itself.
BOOTSTRAP_RESAMPLES = 1000


def proportion_ci(successes: int, trials: int) -> list[float] | None:
    """The 95% Wilson score interval ``[low, high]`` of ``successes / trials``; ``None`` when
    ``trials`` is 0 (the proportion is undefined)."""
    if trials == 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(trials)).proportion_ci(CI_LEVEL, method=CI_METHOD)
    return [float(interval.low), float(interval.high)]


def mcnemar(only_first: int, only_second: int) -> float:
    """Exact McNemar p-value (two-sided) for paired outcomes on the same prompts.

    Args:
        only_first: prompts the first variant gets right and the second wrong.
        only_second: prompts the second variant gets right and the first wrong.

    Under "no difference" each discordant prompt is equally likely to fall either way, so
    ``only_first`` is Binomial(``only_first + only_second``, 1/2). No discordant prompt: 1.0.
    """
    n = int(only_first) + int(only_second)
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(only_first), n, 0.5).pvalue)


def paired(first_ok, second_ok) -> dict:
    """Discordant counts and the McNemar p-value of two boolean outcome vectors on the same
    prompts (``first_ok``, ``second_ok``: equal-length sequences of bools)."""
    only_first = sum(1 for a, b in zip(first_ok, second_ok, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first_ok, second_ok, strict=True) if b and not a)
    return {"n_only_first": only_first, "n_only_second": only_second,
            "p_value": mcnemar(only_first, only_second)}


def row_intervals(row: dict) -> dict:
    """The 95% intervals of a row's three shares, from its counts (``faithfulness_ci`` is
    ``None`` when the full model gets no prompt right), and the paired test of AF1 against the
    full model on the row's prompts."""
    n, n_full = row["n_prompts"], row["n_full_correct"]
    n_both, n_af1 = row["n_af1_correct_of_full"], row["n_af1_correct"]
    full_only, af1_only = n_full - n_both, n_af1 - n_both
    return {
        "faithfulness_ci": proportion_ci(n_both, n_full),
        "full_accuracy_ci": proportion_ci(n_full, n),
        "af1_accuracy_ci": proportion_ci(n_af1, n),
        "ci_method": f"{CI_METHOD} {CI_LEVEL:.0%}",
        "af1_vs_full": {"n_full_only": full_only, "n_af1_only": af1_only,
                        "p_value": mcnemar(full_only, af1_only)},
    }


def bootstrap_method(seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """How :func:`bootstrap_means` intervals are made, in the words a results row records."""
    return f"bootstrap {CI_LEVEL:.0%}, {resamples} resamples over prompts, seed {seed}"


def bootstrap_means(columns: Sequence[np.ndarray], seed: int,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Means of each column over the same prompts resampled with replacement.

    Args:
        columns: ``C`` arrays ``(n,)`` of per-prompt values (the same ``n`` prompts, ``n >= 1``).
        seed: seeds :func:`numpy.random.default_rng`; the same seed and values give the same
            resamples.
    Returns:
        ``(resamples, C)`` float64: row ``b`` holds every column's mean over resample ``b``.
    """
    values = np.stack([np.asarray(c, dtype=np.float64) for c in columns], 1)  # (n, C)
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, values.shape[1]))
    block = max(1, 2_000_000 // max(n, 1))  # index blocks of about 16 MB
    for first in range(0, resamples, block):
        count = min(block, resamples - first)
        index = rng.integers(0, n, size=(count, n))
        out[first:first + count] = values[index].mean(1)
    return out


def percentile_interval(samples: np.ndarray) -> list[float]:
    """The central :data:`CI_LEVEL` percentile interval ``[low, high]`` of bootstrap
    ``samples`` ``(B,)`` (numpy's linear interpolation between order statistics)."""
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(np.asarray(samples, dtype=np.float64), [tail, 100 - tail])
    return [float(low), float(high)]
