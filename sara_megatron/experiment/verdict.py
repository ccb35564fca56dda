"""The experiment's closing sections, appended to the report tools/report.py wrote: whether the
base model learned the task in the anchor only, a verdict per method against FFT written from the
numbers (on the target languages, where the paper claims the gain), the settings, and the wall
time of each stage on this machine."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from sara_megatron.evaluation.records import ITEMS_FILE, read_item_records, read_results
from sara_megatron.evaluation.significance import item_level_comparison, paired_t_test
from sara_megatron.experiment.task import ANCHOR, TARGETS
from sara_megatron.experiment.task_files import LOOKUP_BENCHMARK, MATH_BENCHMARK
from sara_megatron.io import atomic_open

CHANCE = {MATH_BENCHMARK: 0.0, LOOKUP_BENCHMARK: 25.0}  # percent
TITLES = {MATH_BENCHMARK: "arithmetic (MGSM layout)",
          LOOKUP_BENCHMARK: "lookups (Global-MMLU layout)"}
SIGNIFICANCE_LEVEL = 0.05
PARALLEL_STAGES = ("train", "export", "evaluate", "divergence")


def compare(method: dict, baseline: dict, method_items, baseline_items, benchmark: str) -> dict:
    """Target-language comparison of one benchmark: per-language means, the paired t-test over
    the targets, McNemar and the bootstrap interval over the targets' items."""
    languages = [lang for lang in TARGETS if lang in method[benchmark] and lang in baseline[benchmark]]
    ours = [method[benchmark][lang]["mean"] for lang in languages]
    theirs = [baseline[benchmark][lang]["mean"] for lang in languages]
    result = {"languages": languages, "method": ours, "baseline": theirs,
              "difference": sum(ours) / len(ours) - sum(theirs) / len(theirs),
              "t_test": paired_t_test(ours, theirs)}
    result["item_level"] = item_level_comparison(method_items, baseline_items, benchmark,
                                                 languages, resamples=10_000)
    return result


def sentence(name: str, baseline: str, benchmark: str, c: dict) -> str:
    t, item = c["t_test"], c["item_level"]
    b, mcnemar = item["bootstrap"], item["mcnemar"]["p_one_tailed"]
    diff = c["difference"]
    evidence = (f"paired t-test over the {len(c['languages'])} target languages t = {t['t']:.3f}, "
                f"one-tailed p = {t['p_one_tailed']:.3g}; McNemar over {item['items']} items "
                f"one-tailed p = {mcnemar:.3g}; bootstrap difference {b['difference']:.2f} points "
                f"[95% CI {b['low']:.2f}, {b['high']:.2f}]")
    significant = (t["p_one_tailed"] < SIGNIFICANCE_LEVEL and mcnemar < SIGNIFICANCE_LEVEL
                   and b["low"] > 0)
    if math.isclose(diff, 0.0, abs_tol=1e-9):
        claim = f"**{name} tied {baseline}**"
    elif diff > 0 and significant:
        claim = f"**{name} beat {baseline}** by {diff:.2f} points, significant at 5% on all three tests"
    elif diff > 0:
        claim = (f"**{name} was ahead of {baseline} by {diff:.2f} points, not significantly** "
                 "(at least one test above 5%, or the interval includes 0)")
    else:
        claim = f"**{name} did not beat {baseline}**: {-diff:.2f} points behind"
    return f"- {TITLES.get(benchmark, benchmark)}: {claim} ({evidence})."


def base_lines(base: dict) -> list[str]:
    lines = []
    for benchmark, per_language in base.items():
        anchor = per_language.get(ANCHOR, {}).get("mean")
        targets = [per_language[lang]["mean"] for lang in TARGETS if lang in per_language]
        if anchor is None or not targets:
            continue
        target_mean = sum(targets) / len(targets)
        verdict = ("beats chance in the anchor" if anchor > CHANCE[benchmark]
                   else "does NOT beat chance in the anchor")
        learned = ("it is better in the anchor than in the targets" if anchor > target_mean
                   else "it is NOT better in the anchor than in the targets")
        lines.append(f"- {TITLES.get(benchmark, benchmark)}: anchor {anchor:.2f}%, targets "
                     f"{target_mean:.2f}% (chance {CHANCE[benchmark]:.0f}%): the base {verdict}; "
                     f"{learned}.")
    return lines


def append_verdict(report: Path, evaluations: dict[str, Path], settings, timer, baseline: str,
                   base_name: str, base, machine: str) -> dict:
    """Append the sections to `report`; returns the comparisons (method -> benchmark -> dict)."""
    results = {name: read_results(folder)["benchmarks"] for name, folder in evaluations.items()}
    items = {name: read_item_records(Path(folder) / ITEMS_FILE)
             for name, folder in evaluations.items()}
    comparisons: dict = {}
    lines = ["", "## Verdict", "",
             f"Measured on the held-out items in the target languages ({', '.join(TARGETS)}), "
             f"each method's {settings.seeds} seed(s) against {baseline}'s. 'Significant' needs "
             "all three tests at 5% one-tailed (H1: method > baseline) and a bootstrap interval "
             "above 0.", ""]
    for name in results:
        if name in (baseline, base_name):
            continue
        comparisons[name] = {}
        for benchmark in (MATH_BENCHMARK, LOOKUP_BENCHMARK):
            if benchmark not in results[name] or benchmark not in results[baseline]:
                continue
            c = compare(results[name], results[baseline], items[name], items[baseline], benchmark)
            comparisons[name][benchmark] = c
            lines.append(sentence(name, baseline, benchmark, c))
    lines += ["", "The lookups ask about every person of the small world; the fine-tuning corpus "
              "asks only about some of them, so the others' facts reach a target language only "
              "through what the base model knows in the anchor: the transfer SARA's routing "
              "alignment is meant to help.", "",
              "### The base model", ""]
    lines += base_lines(results[base_name])
    lines += ["", f"Base model folder `base/{base.folder.name}` "
              f"({'from the cache' if base.cached else 'trained in this run'}).", "",
              "### Settings", "", "```", *_settings_lines(settings), "```", "",
              "### Wall time", "", f"Machine: {machine}.", "",
              "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} | "
              + (f"{timer.cpu_seconds[stage]:.0f}" if stage in timer.cpu_seconds else "–") + " |"
              for stage, seconds in timer.seconds.items()]
    cpu_total = sum(timer.cpu_seconds.values())
    # Fine-tuning chains and divergence runs go `jobs` at a time; the rest one after another.
    parallel = sum(v for k, v in timer.cpu_seconds.items() if k.split(":")[0] in PARALLEL_STAGES)
    idle_estimate = (cpu_total - parallel) + parallel / max(1, min(settings.jobs, 2))
    lines += ["", f"CPU time of all tools together: {cpu_total:.0f} s. On two otherwise idle cores "
              f"that is about {idle_estimate / 60:.1f} min of wall time (the stages that run "
              f"{settings.jobs} at a time shared between the cores, the others one after "
              "another), plus process start-up waits; on a shared machine wall time grows with "
              "the other programs' load, CPU time does not. Stages that ran at the same time add "
              "up to more wall time than the total.", ""]
    text = report.read_text(encoding="utf-8")
    with atomic_open(report) as f:
        f.write(text + "\n".join(lines))
    return comparisons


def _settings_lines(settings) -> list[str]:
    def flatten(prefix, value):
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                yield from flatten(f"{prefix}{field.name}.", getattr(value, field.name))
        else:
            yield f"{prefix[:-1]} = {value}"
    return list(flatten("", settings))
