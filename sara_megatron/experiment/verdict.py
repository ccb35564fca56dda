"""The experiment's closing sections, appended to the report tools/report.py wrote, written from
summary.json (summary.py) so the report's numbers are the summary's: the verdict per method
against FFT on the held-out items of the target languages, each method's accuracy, anchor
retention and routing divergence, the tests with the minimum detectable effect next to the
observed difference; then whether the base model learned the task in the anchor only (from its
evaluation, the numbers of the report's accuracy table), the settings, and the wall time of
each stage on this machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sara_megatron.evaluation.records import read_results
from sara_megatron.experiment.summary import ALPHA, POWER, RETENTION_FLOOR
from sara_megatron.experiment.task import ANCHOR, TARGETS
from sara_megatron.experiment.task_files import LOOKUP_BENCHMARK, MATH_BENCHMARK
from sara_megatron.io import atomic_open

CHANCE = {MATH_BENCHMARK: 0.0, LOOKUP_BENCHMARK: 25.0}  # percent
ANCHOR_BAR = 95.0  # percent: what the design asks of the base in the anchor, on both tasks
TITLES = {MATH_BENCHMARK: "arithmetic (MGSM layout)",
          LOOKUP_BENCHMARK: "lookups (Global-MMLU layout)"}
PARALLEL_STAGES = ("train", "export", "evaluate", "divergence")


def _number(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def summary_lines(summary: dict) -> list[str]:
    """The verdict, the per-method table and the tests, every number from `summary`.

    Args:
        summary: The summary (`summary.write_summary`).

    Returns:
        The report's Markdown lines.
    """
    methods = summary["methods"]
    layers = summary["aligned_layers"]["layers"]
    items = summary["items_per_language"]
    lines = ["", "## Verdict", "",
             f"On the held-out items of the target languages ({', '.join(TARGETS)}), each "
             f"method's {summary['seeds']} seed(s) against FFT's. 'Significant' needs the paired "
             f"t-test over seeds, McNemar and the bootstrap all at {ALPHA} one-tailed (H1: method "
             "> FFT) and a bootstrap interval above 0.", ""]
    lines += [f"- {sentence}" for sentence in summary["verdict"].splitlines()]
    lines += ["", f"Items per language: arithmetic {items[MATH_BENCHMARK]['held_out']} held out; "
              f"lookups {items[LOOKUP_BENCHMARK]['held_out']} held out (facts of people the "
              f"fine-tuning corpus never asks about) and "
              f"{items[LOOKUP_BENCHMARK]['seen_in_finetuning']} seen in fine-tuning (not in "
              "these numbers). Aligned layers "
              f"{layers[0]}..{layers[-1]}: {summary['aligned_layers']['how_chosen']}.", "",
              "| method | arithmetic (targets) | held-out lookups (targets) | anchor retention | "
              "divergence in the aligned range / base's |", "|---|---|---|---|---|"]
    for name, m in methods.items():
        retention = m["anchor_retention"]
        flag = "" if retention is None or retention >= RETENTION_FLOOR else " (below floor)"
        lines.append(f"| {name} | {_number(m['target_accuracy'][MATH_BENCHMARK])} | "
                     f"{_number(m['target_accuracy'][LOOKUP_BENCHMARK])} | "
                     f"{_number(retention)}{flag} | {_number(m['divergence_ratio'])} |")
    lines += ["", f"Accuracy in percent, mean over seeds; anchor retention = anchor accuracy on "
              f"the held-out facts over the base's (the lookup comparison is void below "
              f"{RETENTION_FLOOR:.2f}); divergence: first seed.", "",
              "| benchmark | method | difference to FFT | paired t (p) | McNemar p | "
              "bootstrap 95% CI (p) | minimum detectable effect |", "|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        for benchmark, c in m.get("tests_against_fft", {}).items():
            t, boot = c["paired_t"], c["bootstrap"]
            lines.append(
                f"| {TITLES[benchmark]} | {name} | {c['difference']:+.2f} | "
                f"{_number(t['t'], 3)} ({_number(t['p_one_tailed'], 3)}) | "
                f"{c['mcnemar']['p_one_tailed']:.3g} | [{boot['low']:.2f}, {boot['high']:.2f}] "
                f"({boot['p_one_tailed']:.3g}) | "
                f"{_number(c['minimum_detectable_effect']['points'])} |")
    lines += ["", f"The minimum detectable effect: the true difference the one-tailed paired "
              f"t-test over seeds would find with probability {POWER} at {ALPHA}, given the "
              "observed spread of the seeds' differences.", ""]
    return lines


def base_lines(base: dict) -> list[str]:
    """One line per benchmark on the base model: whether it beats chance in the anchor, is better
    in the anchor than in the targets, and meets `ANCHOR_BAR`.

    Args:
        base: The base's evaluation benchmarks: benchmark -> language -> {"mean": percent, ...}.

    Returns:
        The Markdown lines (benchmarks without an anchor or target mean are skipped).
    """
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
        bar = (f"it meets the design's {ANCHOR_BAR:.0f}% in the anchor" if anchor >= ANCHOR_BAR
               else f"it is BELOW the design's {ANCHOR_BAR:.0f}% in the anchor: the comparison's "
                    "premise (the base knows the task in the anchor) holds only in part; a longer "
                    "base training (--base-steps) is the setting to change")
        lines.append(f"- {TITLES.get(benchmark, benchmark)}: anchor {anchor:.2f}%, targets "
                     f"{target_mean:.2f}% (chance {CHANCE[benchmark]:.0f}%): the base {verdict}; "
                     f"{learned}; {bar}.")
    return lines


def append_verdict(report: Path, summary: dict, base_evaluation: Path, settings, base,
                   machine: str, cpu_seconds: dict[str, float]) -> None:
    """Append the closing sections to `report`: `summary_lines(summary)`, the base model's
    anchor and target accuracy (from its evaluation folder), the settings and the wall time
    (`summary["stage_seconds"]`, with each tool's CPU seconds).

    Args:
        report: The report.md `tools/report.py` wrote.
        summary: The summary (`summary.write_summary`).
        base_evaluation: The base model's evaluation folder.
        settings: The experiment's settings (`jobs`; every field is listed).
        base: The base model (`BaseModel`).
        machine: A description of the machine (`run.machine_description`).
        cpu_seconds: stage -> CPU seconds of its tool.
    """
    lines = summary_lines(summary)
    lines += ["### The base model", ""]
    lines += base_lines(read_results(base_evaluation)["benchmarks"])
    lines += ["", f"Base model folder `base/{base.folder.name}` "
              f"({'from the cache' if base.cached else 'trained in this run'}).", "",
              "### Settings", "", "```", *_settings_lines(settings), "```", "",
              "### Wall time", "", f"Machine: {machine}.", "",
              "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} | "
              + (f"{cpu_seconds[stage]:.0f}" if stage in cpu_seconds else "–") + " |"
              for stage, seconds in summary["stage_seconds"].items()]
    cpu_total = sum(cpu_seconds.values())
    # Fine-tuning chains and divergence runs go `jobs` at a time; the rest one after another.
    parallel = sum(v for k, v in cpu_seconds.items() if k.split(":")[0] in PARALLEL_STAGES)
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


def _settings_lines(settings) -> list[str]:
    def flatten(prefix, value):
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                yield from flatten(f"{prefix}{field.name}.", getattr(value, field.name))
        else:
            yield f"{prefix[:-1]} = {value}"
    return list(flatten("", settings))
