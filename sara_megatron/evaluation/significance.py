"""Significance of "treatment beats baseline" (paper Appendix A.4, and item-level tests beside it).

The paper pairs the per-language mean accuracies of SARA and FFT and runs a one-tailed paired
t-test (H1: SARA > FFT, df = n - 1). Its Table 6 t-statistics reproduce from its Table 1/7 rows,
but the p-values it prints are the two-tailed ones (Qwen3 Global-MMLU: t = 4.0784, printed
p = 0.0096, one-tailed p = 0.0048). `paired_t_test` returns both, named.

Six language means carry little power. With the per-item records of both runs (`items.jsonl`),
`mcnemar_exact` tests the discordant items and `paired_bootstrap_ci` gives an interval for the
accuracy difference, resampling items.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def paired_t_test(treatment: Sequence[float], baseline: Sequence[float]) -> dict:
    """Paired t-test over matched scores.

    Args:
        treatment: The treatment's scores (e.g. per-language means), at least 2.
        baseline: The baseline's, in the same order.

    Returns:
        t, df, n, mean_difference, p_one_tailed (H1: treatment > baseline), p_two_tailed.
        Zero spread of the differences gives t = ±inf (or nan when every difference is 0) and
        the matching limits of p.
    """
    from scipy.stats import t as t_distribution

    if len(treatment) != len(baseline):
        raise ValueError(f"paired scores need equal lengths, got {len(treatment)} and "
                         f"{len(baseline)}")
    n = len(treatment)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    differences = [float(a) - float(b) for a, b in zip(treatment, baseline)]
    if not all(math.isfinite(d) for d in differences):
        raise ValueError("scores must be finite numbers")
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    df = n - 1
    if variance == 0.0:
        t = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / math.sqrt(variance / n)
    if math.isnan(t):
        p_one = p_two = math.nan
    else:
        p_one = float(t_distribution.sf(t, df))
        p_two = float(min(1.0, 2.0 * t_distribution.sf(abs(t), df)))
    return {"t": t, "df": df, "n": n, "mean_difference": mean,
            "p_one_tailed": p_one, "p_two_tailed": p_two}


def _paired_flags(treatment_correct: Sequence[bool], baseline_correct: Sequence[bool]):
    if len(treatment_correct) != len(baseline_correct):
        raise ValueError(f"paired items need equal lengths, got {len(treatment_correct)} and "
                         f"{len(baseline_correct)}")
    if not treatment_correct:
        raise ValueError("no paired items")
    return [bool(x) for x in treatment_correct], [bool(x) for x in baseline_correct]


def mcnemar_exact(treatment_correct: Sequence[bool], baseline_correct: Sequence[bool]) -> dict:
    """Exact McNemar test over paired items (binomial on the discordant pairs).

    Args:
        treatment_correct: Per item, whether the treatment was right.
        baseline_correct: The baseline's, item for item.

    Returns:
        n, treatment_only (treatment right, baseline wrong), baseline_only, p_one_tailed
        (H1: treatment better), p_two_tailed.
    """
    from scipy.stats import binom

    treatment, baseline = _paired_flags(treatment_correct, baseline_correct)
    treatment_only = sum(a and not b for a, b in zip(treatment, baseline))
    baseline_only = sum(b and not a for a, b in zip(treatment, baseline))
    discordant = treatment_only + baseline_only
    if discordant == 0:
        p_one = p_two = 1.0
    else:
        p_one = float(binom.sf(treatment_only - 1, discordant, 0.5))  # P(X >= treatment_only)
        smaller = min(treatment_only, baseline_only)
        p_two = float(min(1.0, 2.0 * binom.cdf(smaller, discordant, 0.5)))
    return {"n": len(treatment), "treatment_only": treatment_only, "baseline_only": baseline_only,
            "p_one_tailed": p_one, "p_two_tailed": p_two}


def paired_bootstrap_ci(treatment_scores: Sequence[float], baseline_scores: Sequence[float],
                        confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """Percentile bootstrap interval of mean(treatment - baseline), in percentage points.

    Each entry is one item's score in [0, 1] (1/0 for one run, the fraction of runs right for
    several); items are resampled with replacement, keeping each item's pair together.

    Args:
        treatment_scores: Per item, the treatment's score.
        baseline_scores: The baseline's, item for item.
        confidence: The interval's level, in (0, 1).
        resamples: Bootstrap resamples.
        seed: The resampling's seed.

    Returns:
        n, difference, low, high, confidence, resamples, p_one_tailed (the share of
        resampled differences <= 0: the bootstrap's one-tailed p for H1 treatment > baseline).

    Raises:
        ValueError: A confidence outside (0, 1), or score lists that do not pair up.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if len(treatment_scores) != len(baseline_scores):
        raise ValueError("paired items need equal lengths")
    n = len(treatment_scores)
    if n == 0:
        raise ValueError("no paired items")
    differences = 100.0 * (np.asarray(treatment_scores, dtype=np.float64)
                           - np.asarray(baseline_scores, dtype=np.float64))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks keep the index matrix near 8M entries whatever the number of items.
    chunk = max(1, (1 << 23) // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = differences[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"n": n, "difference": float(differences.mean()), "low": float(low),
            "high": float(high), "confidence": confidence, "resamples": resamples,
            "p_one_tailed": float(np.mean(means <= 0.0))}


def minimum_detectable_effect(difference_std: float, n: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest true mean difference a one-tailed paired t-test over `n` pairs detects with
    probability `power` at level `alpha`, when the pairs' differences have standard deviation
    `difference_std` (in the units of the scores; the observed one stands in for the true one).

    Solved exactly on the noncentral t distribution: the test rejects when t > t_{1-alpha, n-1},
    and under a true difference d, t follows a noncentral t with n - 1 degrees of freedom and
    noncentrality d·sqrt(n)/difference_std.

    Args:
        difference_std: Standard deviation of the paired differences (sample, ddof 1).
        n: Number of pairs (e.g. training seeds), at least 2.
        alpha: One-tailed significance level.
        power: The probability of rejecting that the effect must reach.

    Returns:
        The effect, in the scores' units; 0 for a zero spread (any difference is seen).

    Raises:
        ValueError: n < 2, a negative or non-finite spread, not 0 < alpha < power < 1.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct
    from scipy.stats import t as t_distribution

    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    if not (math.isfinite(difference_std) and difference_std >= 0.0):
        raise ValueError(f"the standard deviation must be finite and >= 0, got {difference_std}")
    if not (0.0 < alpha < power < 1.0):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha} and power {power}")
    if difference_std == 0.0:
        return 0.0
    df = n - 1
    critical = float(t_distribution.ppf(1.0 - alpha, df))

    def shortfall(noncentrality: float) -> float:
        return float(nct.sf(critical, df, noncentrality)) - power

    # The power grows with the noncentrality; at critical + 40 it is 1 for any df >= 1.
    noncentrality = brentq(shortfall, 0.0, critical + 40.0, xtol=1e-10)
    return noncentrality * difference_std / math.sqrt(n)


def item_level_comparison(treatment_records: Sequence[dict], baseline_records: Sequence[dict],
                          benchmark: str, languages: Sequence[str] | None = None,
                          resamples: int = 10_000, seed: int = 0) -> dict:
    """Item-level tests over the items both evaluations answered (pooled over languages).

    McNemar pairs each item's answers in the lowest run number both have (one answer per item
    keeps the pairs independent); the bootstrap scores each item by its fraction of runs right over
    the runs both have, and resamples items.

    Args:
        treatment_records: The treatment's item records (items.jsonl).
        baseline_records: The baseline's.
        benchmark: The benchmark compared.
        languages: The languages pooled (None: all).
        resamples: Bootstrap resamples.
        seed: The resampling's seed.

    Returns:
        items (shared), items_only_in_treatment, items_only_in_baseline, mcnemar
        (`mcnemar_exact`), bootstrap (`paired_bootstrap_ci`).

    Raises:
        ValueError: No item is shared.
    """
    wanted = None if languages is None else set(languages)

    def by_item(records):
        table: dict[tuple[str, str], dict[int, bool]] = {}
        for r in records:
            if r["benchmark"] != benchmark or (wanted is not None and r["language"] not in wanted):
                continue
            table.setdefault((r["language"], str(r["item_id"])), {})[int(r["run"])] = \
                bool(r["correct"])
        return table

    treatment, baseline = by_item(treatment_records), by_item(baseline_records)
    shared = sorted(set(treatment) & set(baseline))
    pairs = [(treatment[k], baseline[k], sorted(set(treatment[k]) & set(baseline[k])))
             for k in shared]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        raise ValueError(f"no {benchmark} item was answered in the same run by both evaluations")
    first_run = [(t[runs[0]], b[runs[0]]) for t, b, runs in pairs]
    mcnemar = mcnemar_exact([a for a, _ in first_run], [b for _, b in first_run])
    treatment_scores = [sum(t[r] for r in runs) / len(runs) for t, _, runs in pairs]
    baseline_scores = [sum(b[r] for r in runs) / len(runs) for _, b, runs in pairs]
    bootstrap = paired_bootstrap_ci(treatment_scores, baseline_scores, resamples=resamples,
                                    seed=seed)
    return {"items": len(pairs),
            "items_only_in_treatment": len(set(treatment) - set(baseline)),
            "items_only_in_baseline": len(set(baseline) - set(treatment)),
            "mcnemar": mcnemar, "bootstrap": bootstrap}
