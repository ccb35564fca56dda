"""`<work>/summary.json`: the experiment's numbers, machine-readable; report.md's verdict section
is written from it (verdict.py), so the two cannot disagree.

Every accuracy here is on the held-out items of the target languages: all of the arithmetic, and
the lookups about the people the fine-tuning corpus never asks about (the transfer set). Per
method and seed the accuracy is pooled over the targets' held-out items; the method's number is
the mean over seeds; the tests against FFT are listed in `compare_to_baseline`.

Anchor retention: the method's anchor accuracy on the held-out facts over the base's. Below
RETENTION_FLOOR, for the method or for FFT, the held-out lookups measure forgetting rather than
transfer, and the lookup comparison is void.
"""

from __future__ import annotations

import math
from pathlib import Path

from sara_megatron.analysis.divergence_results import read_divergence
from sara_megatron.evaluation.records import ITEMS_FILE, read_item_records
from sara_megatron.evaluation.significance import (
    item_level_comparison, minimum_detectable_effect, paired_t_test)
from sara_megatron.experiment.task import ANCHOR, TARGETS
from sara_megatron.experiment.task_files import LOOKUP_BENCHMARK, MATH_BENCHMARK
from sara_megatron.io import write_json_atomic

BENCHMARKS = (MATH_BENCHMARK, LOOKUP_BENCHMARK)
ALPHA = 0.05  # one-tailed
POWER = 0.8
RETENTION_FLOOR = 0.9
BOOTSTRAP_RESAMPLES = 10_000


def held_out_records(records, benchmark: str, languages, held_out_ids: set) -> list[dict]:
    """The records of `benchmark` in `languages` whose item is held out.

    Args:
        records: Item records (`items.jsonl` rows: benchmark, language, item_id, run, correct).
        benchmark: The benchmark's name.
        languages: The languages kept.
        held_out_ids: The held-out item ids, as strings.
    """
    wanted = set(languages)
    return [r for r in records if r["benchmark"] == benchmark and r["language"] in wanted
            and str(r["item_id"]) in held_out_ids]


def accuracy_per_run(records) -> dict[int, float]:
    """Percent right per run over the records of that run (pooled over languages).

    Args:
        records: Item records, each with `run` and `correct`.

    Returns:
        run -> accuracy in percent, in run order.
    """
    totals: dict[int, list[int]] = {}
    for r in records:
        entry = totals.setdefault(int(r["run"]), [0, 0])
        entry[0] += bool(r["correct"])
        entry[1] += 1
    return {run: 100.0 * right / n for run, (right, n) in sorted(totals.items())}


def aligned_divergence(path: Path, layers: list[int]) -> float:
    """Mean over target languages and the aligned layers of a divergence result's JS.

    Args:
        path: A divergence JSON (`tools/routing_divergence.py`).
        layers: The aligned layers; each must be among the result's layers.

    Returns:
        The mean Jensen-Shannon divergence.
    """
    result = read_divergence(path)
    index = [result.layers.index(layer) for layer in layers]
    values = [curve[i] for curve in result.divergence.values() for i in index]
    return sum(values) / len(values)


def _finite(value: float) -> float | None:
    """JSON has no inf/nan: None stands for them."""
    return float(value) if math.isfinite(value) else None


def compare_to_baseline(method_records, baseline_records, benchmark: str,
                        held_out_ids: set) -> dict:
    """The three tests and the minimum detectable effect of one method against the baseline on
    one benchmark's held-out target items:

    - paired t-test over seeds (seed s of the method against seed s of FFT: the same data order),
      one-tailed H1 method > FFT;
    - McNemar over the held-out target items, the first seed's answers;
    - paired bootstrap over those items, each scored by its fraction of seeds right (95% interval
      and the share of resampled differences <= 0 as its one-tailed p);
    - the minimum detectable effect of that t-test (one-tailed `ALPHA`, `POWER`) with the
      observed standard deviation of the seeds' differences (None with one seed or no spread).

    Args:
        method_records, baseline_records: The item records of the method and of the baseline
            (seeds merged: run r = seed r).
        benchmark: The benchmark's name.
        held_out_ids: The benchmark's held-out item ids.

    Returns:
        A dict with difference (percent points), paired_t, mcnemar, bootstrap and
        minimum_detectable_effect.
    """
    ours = held_out_records(method_records, benchmark, TARGETS, held_out_ids)
    theirs = held_out_records(baseline_records, benchmark, TARGETS, held_out_ids)
    ours_by_seed, theirs_by_seed = accuracy_per_run(ours), accuracy_per_run(theirs)
    seeds = sorted(set(ours_by_seed) & set(theirs_by_seed))
    a = [ours_by_seed[s] for s in seeds]
    b = [theirs_by_seed[s] for s in seeds]
    differences = [x - y for x, y in zip(a, b)]
    difference = sum(differences) / len(differences)
    result = {"difference": difference}
    if len(seeds) >= 2:
        t = paired_t_test(a, b)
        std = math.sqrt(sum((d - difference) ** 2 for d in differences) / (len(seeds) - 1))
        result["paired_t"] = {"over": f"{len(seeds)} seeds", "t": _finite(t["t"]),
                              "p_one_tailed": _finite(t["p_one_tailed"])}
        # Seeds whose differences did not vary give no spread to size an effect by (the t-test
        # is undefined too): no minimum detectable effect rather than a misleading 0.
        mde = minimum_detectable_effect(std, len(seeds), ALPHA, POWER) if std > 0 else None
    else:
        result["paired_t"] = {"over": "1 seed", "t": None, "p_one_tailed": None}
        std = mde = None
    items = item_level_comparison(ours, theirs, benchmark, TARGETS,
                                  resamples=BOOTSTRAP_RESAMPLES)
    boot = items["bootstrap"]
    result["mcnemar"] = {"items": items["items"],
                         "method_only": items["mcnemar"]["treatment_only"],
                         "baseline_only": items["mcnemar"]["baseline_only"],
                         "p_one_tailed": items["mcnemar"]["p_one_tailed"]}
    result["bootstrap"] = {"difference": boot["difference"], "low": boot["low"],
                           "high": boot["high"], "confidence": boot["confidence"],
                           "p_one_tailed": boot["p_one_tailed"]}
    result["minimum_detectable_effect"] = {
        "points": mde, "seed_difference_std": std, "alpha_one_tailed": ALPHA, "power": POWER}
    return result


def classify(method: str, baseline: str, benchmark: str, c: dict, void: str | None) -> str:
    """One sentence of the verdict from one comparison's numbers.

    Args:
        method: The method's label.
        baseline: The baseline's label.
        benchmark: `MATH_BENCHMARK` or `LOOKUP_BENCHMARK`.
        c: The comparison (`compare_to_baseline`).
        void: Why the comparison is void, or None.

    Returns:
        The sentence, e.g. "arithmetic: SARA tied FFT; this run could detect ...".
    """
    title = {MATH_BENCHMARK: "arithmetic", LOOKUP_BENCHMARK: "held-out lookups"}[benchmark]
    if void:
        return f"{title}: {method} vs {baseline} is void ({void})."
    diff = c["difference"]
    t, mcnemar, boot = c["paired_t"], c["mcnemar"], c["bootstrap"]
    mde = c["minimum_detectable_effect"]["points"]
    significant = (t["p_one_tailed"] is not None and t["p_one_tailed"] < ALPHA
                   and mcnemar["p_one_tailed"] < ALPHA and boot["low"] > 0)
    if math.isclose(diff, 0.0, abs_tol=1e-9):
        claim = f"{method} tied {baseline}"
    elif diff > 0 and significant:
        claim = f"{method} beat {baseline} by {diff:.2f} points, significant on all three tests"
    elif diff > 0:
        claim = f"{method} was ahead of {baseline} by {diff:.2f} points, not significantly"
    else:
        claim = f"{method} did not beat {baseline}: {-diff:.2f} points behind"
    if mde is not None:
        power = f"this run could detect {mde:.2f} points (one-tailed alpha {ALPHA}, power {POWER})"
    elif t["t"] is None and t["over"] == "1 seed":
        power = "no minimum detectable effect (one seed)"
    else:
        power = "no minimum detectable effect (the seeds' differences did not vary)"
    return f"{title}: {claim}; {power}."


def write_summary(path: Path, evaluations: dict[str, Path], divergences: dict[str, Path],
                  held_out_ids: dict[str, set], items: dict, settings, timer, baseline: str,
                  base_name: str, aligned: tuple[int, int], range_file: Path) -> dict:
    """Compute the summary from the evaluation folders (seeds merged: run r = seed r) and the
    divergence results, write it to `path` as JSON and return it.

    Args:
        path: The JSON file to write.
        evaluations: name -> evaluation folder, the base's under `base_name`, the baseline's
            under `baseline`.
        divergences: "before" (the base's) and each method's first seed's divergence JSON.
        held_out_ids: benchmark -> the item ids held out of every training set.
        items: benchmark -> {"held_out": n, "seen_in_finetuning": m}, per language.
        settings: The experiment's settings (`seeds`).
        timer: The `StepTimer` whose stage seconds are recorded.
        baseline: The baseline's name in `evaluations`.
        base_name: The base model's name in `evaluations`.
        aligned: the (first, last) layers read from `range_file`'s suggested range.
        range_file: The base's divergence JSON holding the suggested range.

    Returns:
        The summary: seeds, items, aligned_layers, shifcon_area (when a ShifCon method ran),
        methods, verdict, stage_seconds.
    """
    records = {name: read_item_records(Path(folder) / ITEMS_FILE)
               for name, folder in evaluations.items()}
    layers = list(range(aligned[0], aligned[1] + 1))
    range_result = read_divergence(range_file)
    range_json, shift_area = range_result.suggested_range or {}, range_result.shift_area
    base_div = aligned_divergence(divergences["before"], layers)

    def anchor_facts(name: str) -> float:
        runs = accuracy_per_run(held_out_records(records[name], LOOKUP_BENCHMARK, [ANCHOR],
                                                 held_out_ids[LOOKUP_BENCHMARK]))
        return sum(runs.values()) / len(runs)

    base_anchor = anchor_facts(base_name)
    methods: dict = {}
    for name in evaluations:
        if name == base_name:
            continue
        accuracy = {}
        for benchmark in BENCHMARKS:
            runs = accuracy_per_run(held_out_records(records[name], benchmark, TARGETS,
                                                     held_out_ids[benchmark]))
            accuracy[benchmark] = sum(runs.values()) / len(runs)
        entry = {"target_accuracy": accuracy,
                 "anchor_retention": anchor_facts(name) / base_anchor if base_anchor else None,
                 "divergence_ratio": (aligned_divergence(divergences[name], layers) / base_div
                                      if name in divergences and base_div else None)}
        if name != baseline:
            entry["tests_against_fft"] = {
                b: compare_to_baseline(records[name], records[baseline], b, held_out_ids[b])
                for b in BENCHMARKS}
            entry["minimum_detectable_effect"] = {
                b: entry["tests_against_fft"][b]["minimum_detectable_effect"]["points"]
                for b in BENCHMARKS}
        methods[name] = entry

    lines = []
    baseline_retention = methods[baseline]["anchor_retention"]
    for name, entry in methods.items():
        if name == baseline:
            continue
        for benchmark in BENCHMARKS:
            void = None
            if benchmark == LOOKUP_BENCHMARK:
                low = [(n, r) for n, r in ((name, entry["anchor_retention"]),
                                           (baseline, baseline_retention))
                       if r is None or r < RETENTION_FLOOR]
                if low:
                    void = "; ".join(
                        f"{n}'s anchor retention {'unknown' if r is None else f'{r:.2f}'} is "
                        f"below {RETENTION_FLOOR:.2f}" for n, r in low)
                    void += (": it forgot the anchor's facts, so its target lookups measure "
                             "forgetting, not transfer")
            lines.append(classify(name, baseline, benchmark,
                                  entry["tests_against_fft"][benchmark], void))
    summary = {
        "seeds": settings.seeds,
        "items_per_language": {b: dict(items[b]) for b in BENCHMARKS},
        "aligned_layers": {
            "layers": layers,
            "how_chosen": ("the suggested range of the base model's routing divergence on the "
                           "fine-tuning shards (tools/routing_divergence.py), read by training "
                           "as sara.layers: <file>"),
            "rule": range_json.get("rule"), "alpha": range_json.get("alpha"),
            "window": range_json.get("window")},
        **({"shifcon_area": {
            "shift_layer": shift_area["shift_layer"],
            "shift_back_layer": shift_area["shift_back_layer"],
            "how_chosen": ("the valley of the subspace distance of the base's language vectors "
                           "from the anchor's (tools/routing_divergence.py --language-vectors)")}}
           if shift_area else {}),
        "methods": methods,
        "verdict": "\n".join(lines),  # one sentence per method and benchmark
        "stage_seconds": dict(timer.seconds),
    }
    write_json_atomic(path, summary)
    return summary
