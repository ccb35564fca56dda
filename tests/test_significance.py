"""The paper's significance test (Appendix A.4) and the item-level tests beside it."""

import json
import subprocess
from pathlib import Path

import launch
import pytest
from scipy import stats

from sara_megatron.evaluation.records import ItemRecordWriter, accuracy_summary, write_results
from sara_megatron.evaluation.significance import (
    mcnemar_exact, minimum_detectable_effect, paired_bootstrap_ci, paired_t_test,
)

REPO = Path(__file__).resolve().parents[1]

# SARA and FFT (English anchor) rows of the paper's Table 1 (Qwen3-30B-A3B) and Table 7
# (Phi-3.5-MoE-instruct): hi ne bn te sw en for Global-MMLU and BELEBELE, bn te sw en for MGSM.
PAPER_ROWS = {
    ("global_mmlu", "qwen3"): ([74.66, 72.60, 72.70, 65.76, 61.00, 82.45],
                               [73.97, 71.91, 71.72, 65.60, 59.39, 81.80]),
    ("global_mmlu", "phi35"): ([44.14, 38.25, 28.70, 19.09, 45.66, 80.98],
                               [42.14, 37.39, 27.99, 15.96, 45.42, 80.86]),
    ("belebele", "qwen3"): ([83.44, 80.89, 83.67, 77.44, 77.89, 95.22],
                            [82.22, 82.00, 84.11, 76.56, 77.78, 95.00]),
    ("belebele", "phi35"): ([71.22, 65.00, 61.56, 0.11, 61.67, 93.44],
                            [68.89, 64.56, 55.56, 0.00, 58.22, 93.78]),
    ("mgsm", "qwen3"): ([88.00, 80.80, 83.20, 97.60], [88.40, 84.00, 80.40, 96.00]),
    ("mgsm", "phi35"): ([58.00, 46.00, 54.00, 69.20], [54.80, 44.00, 55.60, 66.40]),
}
# Table 6 as printed: t, and the p-value it prints (which is the two-tailed one).
TABLE_6 = {
    ("global_mmlu", "qwen3"): (4.0784, 0.0096), ("global_mmlu", "phi35"): (2.4705, 0.0565),
    ("belebele", "qwen3"): (0.4222, 0.6904), ("belebele", "phi35"): (2.0086, 0.1008),
    ("mgsm", "qwen3"): (0.1525, 0.8885), ("mgsm", "phi35"): (1.4606, 0.2403),
}


@pytest.mark.parametrize("key", sorted(PAPER_ROWS))
def test_paper_rows_give_table_6(key):
    sara, fft = PAPER_ROWS[key]
    t, printed_p = TABLE_6[key]
    result = paired_t_test(sara, fft)
    assert result["n"] == len(sara) and result["df"] == len(sara) - 1
    assert round(result["t"], 4) == t
    assert round(result["p_two_tailed"], 4) == printed_p  # the paper's "one-tailed" column
    # The one-tailed p of H1 "SARA > FFT" is half of it when t > 0, and matches scipy.
    reference = stats.ttest_rel(sara, fft, alternative="greater")
    assert result["p_one_tailed"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert result["p_one_tailed"] == pytest.approx(printed_p / 2, abs=6e-5)
    swapped = paired_t_test(fft, sara)
    assert swapped["p_one_tailed"] > 0.5
    assert swapped["p_one_tailed"] == pytest.approx(1 - result["p_one_tailed"])


def test_qwen3_global_mmlu_one_tailed_p_is_half_the_printed():
    result = paired_t_test(*PAPER_ROWS[("global_mmlu", "qwen3")])
    assert round(result["p_one_tailed"], 4) == 0.0048


def test_paired_t_test_refuses_bad_input_and_handles_equal_differences():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_test([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([1], [0])
    constant = paired_t_test([2, 3, 4], [1, 2, 3])
    assert constant["t"] == float("inf") and constant["p_one_tailed"] == 0.0


def test_mcnemar_exact_against_the_binomial():
    # 9 items only the treatment got right, 2 only the baseline, 5 both, 4 neither.
    treatment = [1] * 9 + [0] * 2 + [1] * 5 + [0] * 4
    baseline = [0] * 9 + [1] * 2 + [1] * 5 + [0] * 4
    result = mcnemar_exact(treatment, baseline)
    assert (result["treatment_only"], result["baseline_only"], result["n"]) == (9, 2, 20)
    assert result["p_one_tailed"] == pytest.approx(stats.binomtest(9, 11, 0.5, "greater").pvalue)
    assert result["p_two_tailed"] == pytest.approx(stats.binomtest(9, 11, 0.5).pvalue)
    assert mcnemar_exact([1, 0], [1, 0])["p_two_tailed"] == 1.0


def test_paired_bootstrap_interval_covers_the_difference():
    treatment = [1.0] * 70 + [0.0] * 30
    baseline = [1.0] * 60 + [0.0] * 40
    ci = paired_bootstrap_ci(treatment, baseline, resamples=2000, seed=1)
    assert ci["difference"] == pytest.approx(10.0)
    assert ci["low"] < 10.0 < ci["high"] and ci["low"] > 0.0 and ci["high"] < 20.0
    assert ci == paired_bootstrap_ci(treatment, baseline, resamples=2000, seed=1)
    # its one-tailed p: resampled differences <= 0 are rare for a 10-point gain on 100 items,
    # half of them for none, all of them for a loss
    assert 0.0 <= ci["p_one_tailed"] < 0.05
    assert paired_bootstrap_ci(baseline, treatment, resamples=2000, seed=1)["p_one_tailed"] > 0.95
    assert paired_bootstrap_ci(treatment, treatment, resamples=200)["p_one_tailed"] == 1.0


@pytest.mark.parametrize("n", [3, 5, 10])
def test_minimum_detectable_effect_has_the_asked_power(n):
    """Simulated paired differences of that mean and spread: the one-tailed t-test at 5% rejects
    in 80% of 40,000 runs (binomial error about 0.2 points)."""
    import numpy as np

    std = 3.0
    effect = minimum_detectable_effect(std, n, alpha=0.05, power=0.8)
    rng = np.random.default_rng(n)
    draws = rng.normal(effect, std, size=(40_000, n))
    t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / np.sqrt(n))
    rejected = float(np.mean(t > stats.t.ppf(0.95, n - 1)))
    assert rejected == pytest.approx(0.8, abs=0.01)
    # a smaller effect has less power: 10% below it rejects visibly less often
    smaller = rng.normal(0.9 * effect, std, size=(40_000, n))
    t = smaller.mean(axis=1) / (smaller.std(axis=1, ddof=1) / np.sqrt(n))
    assert float(np.mean(t > stats.t.ppf(0.95, n - 1))) < 0.78


def test_minimum_detectable_effect_limits_and_refusals():
    # many pairs: the normal approximation (z_0.95 + z_0.8) * std / sqrt(n)
    n = 4000
    z = stats.norm.ppf(0.95) + stats.norm.ppf(0.8)
    assert minimum_detectable_effect(2.0, n) == pytest.approx(z * 2.0 / n ** 0.5, rel=1e-3)
    assert minimum_detectable_effect(2.0, 5) == pytest.approx(2 * minimum_detectable_effect(1.0, 5))
    assert minimum_detectable_effect(0.0, 5) == 0.0
    for bad in [dict(difference_std=1.0, n=1), dict(difference_std=-1.0, n=5),
                dict(difference_std=float("nan"), n=5),
                dict(difference_std=1.0, n=5, alpha=0.9, power=0.8)]:
        with pytest.raises(ValueError):
            minimum_detectable_effect(**bad)


def _write_evaluation(folder, scores_by_language, correct_by_language):
    folder.mkdir()
    benchmarks = {"belebele": {lang: accuracy_summary(runs, 10)
                               for lang, runs in scores_by_language.items()}}
    write_results(folder, {"model": folder.name}, benchmarks)
    with ItemRecordWriter(folder / "items.jsonl") as writer:
        for lang, flags in correct_by_language.items():
            for run in (1, 2):
                for i, correct in enumerate(flags):
                    writer.write(dict(benchmark="belebele", language=lang, run=run,
                                      item_id=f"q{i}", output="", extracted=None, gold="A",
                                      correct=bool(correct)))


def test_compare_results_folders_in_process(tmp_path):
    """The library side of tools/significance.py: scipy's paired t-test over the languages both
    folders hold, the item-level part, a note for an unfinished evaluation, and user errors."""
    from sara_megatron.evaluation.significance_files import (
        ComparisonError, compare_results, format_significance,
    )

    sara, fft = PAPER_ROWS[("belebele", "qwen3")]
    languages = ["hi", "ne", "bn", "te", "sw", "en"]
    _write_evaluation(tmp_path / "sara", {l: [s, s] for l, s in zip(languages, sara)},
                      {l: [1] * 8 + [0] * 2 for l in languages})
    _write_evaluation(tmp_path / "fft", {l: [s, s] for l, s in zip(languages, fft)},
                      {l: [1] * 6 + [0] * 4 for l in languages})
    treatment, baseline = str(tmp_path / "sara" / "results.json"), str(tmp_path / "fft")
    notes = []
    result = compare_results(treatment, baseline, "belebele", resamples=200, note=notes.append)
    reference = stats.ttest_rel(sara, fft)
    assert result["languages"] == languages and notes == []
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["p_two_tailed"] == pytest.approx(reference.pvalue)
    assert result["item_level"]["items"] == 60
    text = format_significance(result)
    assert text.startswith("belebele over hi, ne, bn, te, sw, en: paired t-test")
    assert "item level, 60 items" in text

    unfinished = json.loads((tmp_path / "fft" / "results.json").read_text())
    unfinished["complete"] = False
    (tmp_path / "fft" / "results.json").write_text(json.dumps(unfinished))
    compare_results(treatment, baseline, "belebele", ["hi", "ne"], resamples=200,
                    note=notes.append)
    assert len(notes) == 1 and "unfinished evaluation" in notes[0]

    with pytest.raises(ComparisonError, match="--treatment: no mgsm results"):
        compare_results(treatment, baseline, "mgsm")
    with pytest.raises(ComparisonError, match="--treatment has no belebele results for zz"):
        compare_results(treatment, baseline, "belebele", ["hi", "zz"])
    with pytest.raises(ComparisonError, match="at least 2 languages"):
        compare_results(treatment, baseline, "belebele", ["hi"])


def run_tool(*args):
    return subprocess.run(launch.tool("significance", *args),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.multiprocess
def test_tool_from_results_folders_with_items(tmp_path):
    sara, fft = PAPER_ROWS[("belebele", "qwen3")]
    languages = ["hi", "ne", "bn", "te", "sw", "en"]
    _write_evaluation(tmp_path / "sara", {l: [s, s] for l, s in zip(languages, sara)},
                      {l: [1] * 8 + [0] * 2 for l in languages})
    _write_evaluation(tmp_path / "fft", {l: [s, s] for l, s in zip(languages, fft)},
                      {l: [1] * 6 + [0] * 4 for l in languages})
    proc = run_tool("--treatment", str(tmp_path / "sara" / "results.json"),
                    "--baseline", str(tmp_path / "fft"), "--benchmark", "belebele", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert round(result["t"], 4) == 0.4222 and result["languages"] == languages
    item_level = result["item_level"]
    assert item_level["items"] == 60
    assert item_level["mcnemar"]["treatment_only"] == 12
    assert item_level["mcnemar"]["baseline_only"] == 0
    assert item_level["bootstrap"]["difference"] == pytest.approx(20.0)

    proc = run_tool("--treatment", str(tmp_path / "sara"), "--baseline", str(tmp_path / "fft"),
                    "--benchmark", "belebele", "--languages", "hi,ne,bn")
    assert proc.returncode == 0, proc.stderr
    assert "p one-tailed" in proc.stdout and "item level, 30 items" in proc.stdout


@pytest.mark.multiprocess
def test_tool_scores_and_errors():
    proc = run_tool("--treatment-scores", "74.66,72.60,72.70,65.76,61.00,82.45",
                    "--baseline-scores", "73.97,71.91,71.72,65.60,59.39,81.80", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert round(result["t"], 4) == 4.0784 and round(result["p_one_tailed"], 4) == 0.0048
    assert set(result) == {"t", "df", "n", "mean_difference", "p_one_tailed", "p_two_tailed"}
    bad = run_tool("--treatment-scores", "1,2,3", "--baseline-scores", "1,2")
    assert bad.returncode == 2 and "significance.py: error: 3 treatment scores" in bad.stderr
    assert run_tool("--treatment-scores", "1,2").returncode == 2
