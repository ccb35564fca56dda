"""One Markdown report (`report.md` + PNGs in one folder) from named runs, their evaluations and
divergence results: routing divergence with the suggested alignment range (U-curve, before / FFT /
SARA side by side, aligned-range ratios), expert usage, training dynamics, the Table-1-style
accuracy table, significance of each method against a named baseline, accuracy by checkpoint.
A section whose inputs are missing is left out with a line saying what to run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from sara_megatron.analysis.alignment_range import (
    DEFAULT_ALPHA,
    DEFAULT_WINDOW,
    suggest_alignment_range,
)
from sara_megatron.analysis.divergence_plots import (
    plot_divergence_comparison,
    plot_u_curve,
    suggested_range_of,
)
from sara_megatron.analysis.divergence_results import range_mean, read_divergence
from sara_megatron.io import atomic_open
from sara_megatron.tool_errors import InputError

REPORT_FILE = "report.md"
BENCHMARK_ORDER = ("global_mmlu", "belebele", "mgsm")


@dataclasses.dataclass
class ReportInputs:
    """What a report is made from; a section whose inputs are empty is left out.

    Attributes:
        title: The report's title.
        divergence: {name: divergence JSON file}.
        divergence_baseline: The divergence result the others are compared with; None: the
            first.
        normalized: Use the entropy-normalised curves instead of JS.
        range_alpha, range_window: The alignment-range rule's parameters, used when the
            baseline result holds no suggested range.
        training_logs: {run: training JSON log}.
        evaluations: {name: evaluation results folder}.
        baseline: The evaluation every other one is tested against.
        checkpoint_evaluations: [(run, step, evaluation results folder)] of intermediate
            checkpoints.
        expert_usage: The JSON file of `tools/routing_divergence.py --expert-usage`.
        usage_layers: The layers whose expert usage is drawn; None: the first, middle and last
            measured layer.
        bootstrap_resamples: Resamples of the paired bootstrap in the significance section.
    """

    title: str = "SARA report"
    divergence: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> JSON
    divergence_baseline: Optional[str] = None  # default: the first divergence result
    normalized: bool = False  # the entropy-normalised curves instead of JS
    range_alpha: float = DEFAULT_ALPHA  # used when the baseline result holds no suggested range
    range_window: int = DEFAULT_WINDOW
    training_logs: dict[str, str] = dataclasses.field(default_factory=dict)  # run -> JSON log
    evaluations: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> results folder
    baseline: Optional[str] = None  # evaluation every other one is tested against
    checkpoint_evaluations: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    expert_usage: Optional[str] = None  # JSON of tools/routing_divergence.py --expert-usage
    usage_layers: Optional[list[int]] = None  # default: first, middle and last measured layer
    bootstrap_resamples: int = 10_000


def divergence_markdown_table(layers, columns: dict[str, dict[str, list[float]]]) -> list[str]:
    """Rows (layer, language) then the per-language means; one column per result; the numbers
    formatted as `format_divergence_table` prints them.

    Args:
        layers: The measured layers.
        columns: {result name: {language: one value per layer}}, all with the same languages.

    Returns:
        The Markdown table's lines.
    """
    names = list(columns)
    languages = list(next(iter(columns.values())))
    lines = ["| layer | lang | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for li, layer in enumerate(layers):
        for lang in languages:
            lines.append(f"| {layer} | {lang} | " + " | ".join(
                f"{columns[n][lang][li]:.3e}" for n in names) + " |")
    for lang in languages:
        lines.append(f"| mean | {lang} | " + " | ".join(
            f"{sum(columns[n][lang]) / len(layers):.3e}" for n in names) + " |")
    return lines


def _missing(what: str, how: str) -> list[str]:
    """The line a section leaves when its inputs are missing."""
    return [f"_Left out: {what}. To include it, {how}._", ""]


def _image(name: str, caption: str) -> list[str]:
    return [f"![{caption}]({name})", ""]


# --- sections ------------------------------------------------------------------------------------

def divergence_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The routing-divergence section: the table, the suggested alignment range, ShifCon's area,
    the U-curve and, with several results, their side-by-side comparison.

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.

    Raises:
        InputError: The baseline is not among the results, or the results measure other layers
            or languages.
    """
    lines = ["## Routing divergence", ""]
    if not inputs.divergence:
        return lines + _missing(
            "no divergence result given", "run `python tools/routing_divergence.py --checkpoint CKPT "
            "(--shards DIR | --benchmark global_mmlu --languages hi,ne,bn,te,sw --data-dir DIR) "
            "--json NAME.json` for each model and pass `--divergence NAME=NAME.json`")
    results = {name: read_divergence(path) for name, path in inputs.divergence.items()}
    baseline = inputs.divergence_baseline or next(iter(results))
    if baseline not in results:
        raise InputError(f"divergence baseline {baseline!r} is not among {', '.join(results)}")
    base = results[baseline]
    for name, result in results.items():
        if result.layers != base.layers or result.languages != base.languages:
            raise InputError(f"divergence results {name!r} and {baseline!r} measure other layers "
                             "or languages; compare results of the same measurement")
    curve = "JS / mean entropy" if inputs.normalized else "JS(anchor ‖ target)"
    anchor = f", anchor {base.anchor}" if base.anchor else ""
    lines += [f"Per layer: mean over parallel groups of {curve}{anchor}.", ""]
    lines += divergence_markdown_table(base.layers, {n: r.curves(inputs.normalized)
                                                     for n, r in results.items()})
    lines.append("")

    aligned, how = suggested_range_of(base), "saved in the divergence result"
    if aligned is None:
        found = suggest_alignment_range(base.layers, base.curves(inputs.normalized),
                                        inputs.range_alpha, inputs.range_window)
        aligned = (found.first_layer, found.last_layer)
        how = f"computed here (alpha {found.alpha:g}, window {found.window})"
        rule = found.to_json()
    else:
        rule = base.suggested_range
    lines += ["### Suggested alignment range", "",
              f"Layers **{aligned[0]}..{aligned[1]}** (from `{baseline}`, {how}): the longest run "
              f"of layers whose smoothed mean divergence (window {rule['window']}) stays at or "
              f"below {rule['threshold']:.4g} = min + {rule['alpha']:g} × (max − min). Train with "
              f"`sara.layers: {inputs.divergence[baseline]}` (or `sara.first_layer: {aligned[0]}`, "
              f"`sara.last_layer: {aligned[1]}`).", ""]
    lines += shift_area_lines(base, baseline)
    plot_u_curve(base, os.path.join(out_dir, "divergence_u_curve.png"), aligned=aligned,
                 normalized=inputs.normalized, title=f"{baseline}: layer-wise routing divergence")
    lines += _image("divergence_u_curve.png", f"U-curve of {baseline}")
    if len(results) > 1:
        ratios = plot_divergence_comparison(
            results, os.path.join(out_dir, "divergence_comparison.png"), baseline=baseline,
            aligned=aligned, normalized=inputs.normalized)
        lines += _image("divergence_comparison.png", "divergence side by side")
        lines += [f"Aligned-range ({aligned[0]}..{aligned[1]}) mean divergence, and its ratio to "
                  f"`{baseline}`:", "", "| result | aligned-range mean | ratio |", "|---|---|---|"]
        for name, result in results.items():
            lines.append(f"| {name} | {range_mean(result, *aligned, inputs.normalized):.3e} | "
                         f"{ratios[name]:.4f} |")
        lines.append("")
    return lines


def shift_area_lines(result, name: str) -> list[str]:
    """The report's lines on ShifCon's suggested area, when the divergence result holds one.

    Args:
        result: A `DivergenceResult`; its `shift_area` comes from
            `tools/routing_divergence.py --language-vectors` (`analysis/shift_area.py`).
        name: The result's name in the report.

    Returns:
        Markdown lines: the suggested layers, the rule and the per-layer distance table; none
        when the result holds no area.
    """
    area = result.shift_area
    if not area:
        return []
    lines = ["### Suggested ShifCon area", "",
             f"`shifcon.shift_layer: {area['shift_layer']}`, `shifcon.shift_back_layer: "
             f"{area['shift_back_layer']}` (from `{name}`): the valley of the subspace distance "
             "between each target language's L2-normalised sentence-mean representation and "
             f"the anchor's, by the rule above (window {area['window']}, threshold "
             f"{area['threshold']:.4g} = min + {area['alpha']:g} × (max − min)).", ""]
    lines += divergence_markdown_table(area["layers"], {"distance": area["distance"]})
    return lines + [""]


def expert_usage_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The expert-usage section: heatmaps at the chosen layers.

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.
    """
    from sara_megatron.analysis.expert_usage import plot_expert_usage, read_expert_usage

    lines = ["## Expert usage", ""]
    if not inputs.expert_usage:
        return lines + _missing("no expert-usage file given", "add `--expert-usage usage.json` to "
                                "`tools/routing_divergence.py` and pass `--expert-usage usage.json`")
    usage = read_expert_usage(inputs.expert_usage)
    layers = inputs.usage_layers or sorted({usage.layers[0], usage.layers[len(usage.layers) // 2],
                                            usage.layers[-1]})
    lines += [f"Mean dense routing probability and top-{usage.top_k} selection share per expert "
              f"and language, beside their difference from {usage.anchor}.", ""]
    for layer in layers:
        name = f"expert_usage_layer{layer}.png"
        plot_expert_usage(usage, layer, os.path.join(out_dir, name))
        lines += _image(name, f"expert usage, layer {layer}")
    return lines


def training_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The training-dynamics section: the CE / LB / JS figure and each run's first and last values.

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.
    """
    from sara_megatron.analysis.training_dynamics import plot_training_dynamics, read_json_log

    lines = ["## Training dynamics", ""]
    if not inputs.training_logs:
        return lines + _missing("no training log given", "set `logging.json_log: RUN.jsonl` in the "
                                "training config and pass `--run NAME=RUN.jsonl`")
    runs = {name: read_json_log(path) for name, path in inputs.training_logs.items()}
    plot_training_dynamics(runs, os.path.join(out_dir, "training_dynamics.png"))
    lines += _image("training_dynamics.png", "training dynamics")
    lines += ["| run | steps | CE first | CE last | LB first | LB last | JS first | JS last |",
              "|---|---|---|---|---|---|---|---|"]
    for name, records in runs.items():
        first, last = records[0], records[-1]
        cells = [f"{r.get(k, float('nan')):.4g}" for k in ("ce", "lb", "js") for r in (first, last)]
        lines.append(f"| {name} | {first['step']}..{last['step']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _read_evaluations(paths: dict[str, str]) -> dict[str, dict]:
    from sara_megatron.evaluation.records import read_results

    return {name: read_results(path)["benchmarks"] for name, path in paths.items()}


def _benchmarks(evaluations: dict[str, dict]) -> list[str]:
    present = {b for e in evaluations.values() for b in e}
    return [b for b in BENCHMARK_ORDER if b in present] + sorted(present - set(BENCHMARK_ORDER))


def accuracy_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The accuracy section: the Table-1-style table, one row per benchmark and evaluation.

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.
    """
    from sara_megatron.evaluation.records import ordered_languages, table_row

    lines = ["## Accuracy", ""]
    if not inputs.evaluations:
        return lines + _missing("no evaluation given", "run `python tools/evaluate.py ... "
                                "--output DIR` for each model and pass `--eval NAME=DIR`")
    evaluations = _read_evaluations(inputs.evaluations)
    languages = ordered_languages({lang for e in evaluations.values() for per in e.values()
                                   for lang in per})
    lines += ["| Benchmark | Model | " + " | ".join(languages) + " | Avg. |",
              "|---|---|" + "---|" * (len(languages) + 1)]
    for benchmark in _benchmarks(evaluations):
        for name, evaluation in evaluations.items():
            per_language = evaluation.get(benchmark)
            if per_language is not None:
                lines.append(table_row(benchmark, name, per_language, languages))
    lines += ["", "Accuracy in percent: mean ± sample standard deviation (ddof 1) over runs; Avg. "
                  "over the languages the row has; – : no such result.", ""]
    return lines


def significance_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The significance section: each method against the baseline per benchmark (paired t-test;
    McNemar and a paired bootstrap when both evaluations kept their items).

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.

    Raises:
        InputError: The baseline is not among the evaluations.
    """
    from sara_megatron.evaluation.records import ITEMS_FILE, ordered_languages, read_item_records
    from sara_megatron.evaluation.significance import item_level_comparison, paired_t_test

    lines = ["## Significance", ""]
    if len(inputs.evaluations) < 2 or inputs.baseline is None:
        return lines + _missing("no baseline and method to compare", "pass `--eval NAME=DIR` for "
                                "the baseline and at least one method, and `--baseline NAME`")
    if inputs.baseline not in inputs.evaluations:
        raise InputError(f"baseline {inputs.baseline!r} is not among the evaluations "
                         f"({', '.join(inputs.evaluations)})")
    evaluations = _read_evaluations(inputs.evaluations)
    base = evaluations[inputs.baseline]
    lines += [f"Paired t-test over the per-language mean accuracies (H1: method > "
              f"`{inputs.baseline}`, df = languages − 1); with both evaluations' items.jsonl, the "
              "exact McNemar test over the items (first shared run) and a paired bootstrap 95% "
              "interval of the accuracy difference (points).", "",
              "| Benchmark | method | languages | mean diff | t | df | p one-tailed | p two-tailed "
              "| McNemar p one-tailed | bootstrap diff [95% CI] |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    items_of = {}
    for name, path in inputs.evaluations.items():
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        items = os.path.join(folder, ITEMS_FILE)
        items_of[name] = read_item_records(items) if os.path.isfile(items) else None
    for benchmark in _benchmarks(evaluations):
        for name, evaluation in evaluations.items():
            if name == inputs.baseline or benchmark not in evaluation or benchmark not in base:
                continue
            languages = ordered_languages(set(evaluation[benchmark]) & set(base[benchmark]))
            if len(languages) < 2:
                continue
            test = paired_t_test([evaluation[benchmark][lang]["mean"] for lang in languages],
                                 [base[benchmark][lang]["mean"] for lang in languages])
            mcnemar = bootstrap = "–"
            if items_of[name] is not None and items_of[inputs.baseline] is not None:
                try:
                    item_level = item_level_comparison(
                        items_of[name], items_of[inputs.baseline], benchmark, languages,
                        resamples=inputs.bootstrap_resamples)
                    mcnemar = f"{item_level['mcnemar']['p_one_tailed']:.4g}"
                    b = item_level["bootstrap"]
                    bootstrap = f"{b['difference']:.2f} [{b['low']:.2f}, {b['high']:.2f}]"
                except ValueError:
                    pass
            lines.append(f"| {benchmark} | {name} | {','.join(languages)} | "
                         f"{test['mean_difference']:.4f} | {test['t']:.4f} | {test['df']} | "
                         f"{test['p_one_tailed']:.4g} | {test['p_two_tailed']:.4g} | {mcnemar} | "
                         f"{bootstrap} |")
    lines.append("")
    return lines


def checkpoint_accuracy_section(inputs: ReportInputs, out_dir: str) -> list[str]:
    """The accuracy-by-checkpoint section: the figure and a table of the mean accuracy over
    languages per benchmark, run and step.

    Args:
        inputs: The report's inputs.
        out_dir: The folder its PNGs are written to.

    Returns:
        The section's Markdown lines.
    """
    from sara_megatron.analysis.training_dynamics import plot_accuracy_by_checkpoint
    from sara_megatron.evaluation.records import read_results

    lines = ["## Accuracy by checkpoint", ""]
    if not inputs.checkpoint_evaluations:
        return lines + _missing("no evaluation of intermediate checkpoints", "evaluate each saved "
                                "checkpoint (export it, then `tools/evaluate.py --output DIR`) and "
                                "pass `--checkpoint-eval RUN:STEP=DIR`")
    points: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, step, path in inputs.checkpoint_evaluations:
        for benchmark, per_language in read_results(path)["benchmarks"].items():
            if per_language:
                mean = sum(e["mean"] for e in per_language.values()) / len(per_language)
                points.setdefault(benchmark, {}).setdefault(run, []).append((step, mean))
    order = [b for b in BENCHMARK_ORDER if b in points] + sorted(set(points) - set(BENCHMARK_ORDER))
    points = {b: points[b] for b in order}
    plot_accuracy_by_checkpoint(points, os.path.join(out_dir, "accuracy_by_checkpoint.png"))
    lines += _image("accuracy_by_checkpoint.png", "accuracy by checkpoint")
    lines += ["| Benchmark | run | step | accuracy (mean over languages) |", "|---|---|---|---|"]
    for benchmark, runs in points.items():
        for run, values in runs.items():
            for step, accuracy in sorted(values):
                lines.append(f"| {benchmark} | {run} | {step} | {accuracy:.2f} |")
    lines.append("")
    return lines


SECTIONS = (divergence_section, expert_usage_section, training_section, accuracy_section,
            significance_section, checkpoint_accuracy_section)


def write_report(inputs: ReportInputs, out_dir: str | os.PathLike) -> str:
    """Write report.md and its PNGs into `out_dir` (made when missing).

    Args:
        inputs: The report's inputs.
        out_dir: The report's folder.

    Returns:
        report.md's path.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# {inputs.title}", ""]
    for section in SECTIONS:
        lines += section(inputs, out_dir)
    path = os.path.join(out_dir, REPORT_FILE)
    with atomic_open(path) as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    return path
