"""Is one evaluation better than another, from their results folders (`tools/significance.py`).

The paper's paired t-test over languages (each language's mean accuracy, `paired_t_test`), and,
when both folders also hold items.jsonl with the same items, the item-level comparison
(`item_level_comparison`): a handful of language means has little power, the pooled items more.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Optional, Sequence

from sara_megatron.evaluation.records import (
    ITEMS_FILE,
    ordered_languages,
    read_item_records,
    read_results,
)
from sara_megatron.evaluation.significance import item_level_comparison, paired_t_test
from sara_megatron.tool_errors import UserFacingError

log = logging.getLogger(__name__)


class ComparisonError(UserFacingError, ValueError):
    """The two results cannot be compared as asked (missing benchmark or languages)."""


def results_folder(path: str) -> str:
    """The folder of a results.json, or `path` itself when it is the folder.

    Args:
        path: A results.json or its folder.
    """
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def compare_results(
    treatment: str,
    baseline: str,
    benchmark: str,
    languages: Optional[Sequence[str]] = None,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    note: Optional[Callable[[str], None]] = None,
) -> dict:
    """Compare two evaluations on one benchmark.

    Args:
        treatment: Its results.json or folder.
        baseline: Its results.json or folder.
        benchmark: The benchmark compared.
        languages: The languages (default: every language both results have).
        resamples: Bootstrap resamples of the item-level comparison.
        seed: Their seed.
        note: Where remarks go (an unfinished evaluation, items missing); default: a warning.

    Returns:
        The paired t-test (`significance.paired_t_test`) over the languages' means, with
        "benchmark", "languages" and, when both folders hold items, "item_level"
        (`significance.item_level_comparison`).

    Raises:
        ComparisonError: A results file unreadable, or the benchmark or a language missing.
    """
    note = note or log.warning
    try:
        results = {"--treatment": read_results(treatment), "--baseline": read_results(baseline)}
    except (OSError, ValueError) as e:
        raise ComparisonError(str(e)) from e
    paths = {"--treatment": treatment, "--baseline": baseline}
    per_language = []
    for flag, result in results.items():
        if result.get("complete") is False:
            note(f"{paths[flag]} is an unfinished evaluation; only its fully answered languages "
                 "are there")
        entries = result["benchmarks"].get(benchmark)
        if not entries:
            raise ComparisonError(f"{flag}: no {benchmark} results in {paths[flag]}")
        per_language.append(entries)
    if languages is not None:
        languages = list(languages)
        for flag, entries in zip(results, per_language):
            missing = [lang for lang in languages if lang not in entries]
            if missing:
                raise ComparisonError(f"{flag} has no {benchmark} results for "
                                      f"{', '.join(missing)}")
    else:
        languages = ordered_languages(lang for lang in per_language[0] if lang in per_language[1])
    if len(languages) < 2:
        raise ComparisonError(f"a paired t-test needs at least 2 languages, got {languages}")
    result = paired_t_test([per_language[0][lang]["mean"] for lang in languages],
                           [per_language[1][lang]["mean"] for lang in languages])
    result["benchmark"], result["languages"] = benchmark, languages
    items = [os.path.join(results_folder(path), ITEMS_FILE) for path in (treatment, baseline)]
    if all(os.path.isfile(path) for path in items):
        try:
            result["item_level"] = item_level_comparison(
                read_item_records(items[0]), read_item_records(items[1]), benchmark,
                languages, resamples=resamples, seed=seed)
        except ValueError as e:
            result["item_level"] = {"skipped": str(e)}
    return result


def format_significance(result: dict) -> str:
    """The result of `paired_t_test` or `compare_results` as a few lines of text.

    Args:
        result: That result.
    """
    where = (f"{result['benchmark']} over {', '.join(result['languages'])}: "
             if "benchmark" in result else "")
    lines = [
        f"{where}paired t-test (H1: treatment > baseline), n = {result['n']}, df = {result['df']}",
        f"  mean difference {result['mean_difference']:+.4f}   t = {result['t']:.4f}",
        f"  p one-tailed = {result['p_one_tailed']:.4g}   "
        f"(two-tailed p = {result['p_two_tailed']:.4g})",
    ]
    item_level = result.get("item_level")
    if item_level and "skipped" in item_level:
        lines.append(f"  item level: skipped ({item_level['skipped']})")
    elif item_level:
        m, b = item_level["mcnemar"], item_level["bootstrap"]
        lines.append(
            f"  item level, {item_level['items']} items: McNemar exact (one run) "
            f"{m['treatment_only']} vs {m['baseline_only']} discordant, "
            f"p one-tailed = {m['p_one_tailed']:.4g}, two-tailed = {m['p_two_tailed']:.4g}")
        lines.append(
            f"  accuracy difference {b['difference']:+.2f} points, "
            f"{100 * b['confidence']:.0f}% bootstrap interval [{b['low']:+.2f}, {b['high']:+.2f}]")
    return "\n".join(lines)


def finite_or_null(value):
    """A float for strict JSON: ±inf and nan (t when every language moved by the same amount)
    become None; anything else is returned as it is.

    Args:
        value: A number (or anything).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    return value
