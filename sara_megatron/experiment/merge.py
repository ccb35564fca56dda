"""One evaluation folder per method from its seeds' folders: run r is the model of training seed r.

The merged folder has the files `tools/evaluate.py` writes (results.json, items.jsonl, table.md),
so `tools/report.py` and `tools/significance.py` read it unchanged: mean ± std over runs becomes
mean ± std over training seeds, and the item-level tests pair items across methods.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sara_megatron.evaluation.records import (
    ITEMS_FILE, TABLE_FILE, accuracy_summary, ordered_languages, read_item_records, read_results,
    render_table, write_results)
from sara_megatron.io import atomic_open


def merge_seed_evaluations(seed_folders: list[Path], out: Path) -> dict:
    """Write `out` from each seed's single-run evaluation.

    Args:
        seed_folders: One `tools/evaluate.py` output folder per training seed, in seed order.
        out: The merged folder (created if missing).

    Returns:
        The merged benchmarks: benchmark -> language -> accuracy summary over the seeds.

    Raises:
        ValueError: A seed's evaluation did not finish or has more than one run.
    """
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [read_results(folder) for folder in seed_folders]
    for folder, results in zip(seed_folders, per_seed):
        if not results.get("complete"):
            raise ValueError(f"{folder}: the evaluation did not finish")
        for benchmark, languages in results["benchmarks"].items():
            for language, entry in languages.items():
                if len(entry["runs"]) != 1:
                    raise ValueError(f"{folder}: {benchmark}/{language} has "
                                     f"{len(entry['runs'])} runs; one per seed is merged")
    benchmarks: dict = {}
    for benchmark, languages in per_seed[0]["benchmarks"].items():
        benchmarks[benchmark] = {}
        for language, entry in languages.items():
            accuracies = [r["benchmarks"][benchmark][language]["runs"][0] for r in per_seed]
            benchmarks[benchmark][language] = accuracy_summary(accuracies, entry["n"])
    settings = dict(per_seed[0]["settings"])
    settings["runs_are"] = "training seeds"
    settings["seed_folders"] = [os.fspath(f) for f in seed_folders]
    with atomic_open(out / ITEMS_FILE) as f:
        for seed, folder in enumerate(seed_folders, start=1):
            for record in read_item_records(Path(folder) / ITEMS_FILE):
                f.write(json.dumps({**record, "run": seed}, ensure_ascii=False) + "\n")
    languages = ordered_languages({lang for per in benchmarks.values() for lang in per})
    with atomic_open(out / TABLE_FILE) as f:
        f.write(render_table(benchmarks, languages, out.name) + "\n")
    write_results(out, settings, benchmarks, complete=True)
    return benchmarks
