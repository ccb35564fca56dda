"""The files an evaluation writes into its output folder, and how they are read back.

    results.json   {"settings": {...}, "benchmarks": {bench: {lang: {"runs": [...], "mean", "std",
                   "n"}}}}; accuracies in percent, std the sample standard deviation (ddof 1)
    items.jsonl    one line per (benchmark, language, run, item_id): output, extracted, gold, correct
    table.md       the paper's Table 1 shape: languages as columns, "mean ± std", Avg.

items.jsonl is appended and flushed item by item, so a killed run loses at most the line it was
writing; reading ignores (and the writer cuts off) such a torn last line.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping, Sequence

from sara_megatron.data.languages import PAPER_ANCHOR_LANGUAGES, PAPER_TARGET_LANGUAGES
from sara_megatron.io import read_json_file, read_jsonl_objects, write_json_atomic
from sara_megatron.jobs import JsonlRecord
from sara_megatron.tool_errors import InputError

RESULTS_FILE = "results.json"
ITEMS_FILE = "items.jsonl"
TABLE_FILE = "table.md"
ITEM_KEYS = ("benchmark", "language", "run", "item_id", "output", "extracted", "gold", "correct")


def record_key(record: Mapping) -> tuple[str, str, int, str]:
    """The key of an item record: (benchmark, language, run, item_id).

    Args:
        record: An item record (`run` read as int, `item_id` as str).
    """
    return (record["benchmark"], record["language"], int(record["run"]), str(record["item_id"]))


def _check_item_record(path: str, line_number: int, record: Mapping) -> None:
    missing = [k for k in ITEM_KEYS if k not in record]
    if missing:
        raise InputError(f"{path}:{line_number}: missing {', '.join(missing)}")


def read_item_records(path: str | os.PathLike) -> list[dict]:
    """The records of an items.jsonl; a torn last line (no newline) is left out, not cut: the
    evaluation writing the file may still be running.

    Args:
        path: The items.jsonl.

    Returns:
        The records, in file order.

    Raises:
        ValueError: A line that is not a JSON object, or a record missing one of `ITEM_KEYS`.
    """
    records = []
    for line_number, record in read_jsonl_objects(path, complete_lines_only=True):
        _check_item_record(os.fspath(path), line_number, record)
        records.append(record)
    return records


class ItemRecordWriter(JsonlRecord):
    """items.jsonl as a job record: `append` (or `write`) adds one flushed line of the
    `ITEM_KEYS` of a record (not fsynced: an evaluation records many items a second); `load` reads the file back (a torn last line cut off first),
    keyed by `record_key`, first record of a key winning.

    Args:
        path: The items.jsonl file (need not exist; created by `open`, which `JobPool.run` calls, or the first write).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, key=record_key, check=_check_item_record, fields=ITEM_KEYS,
                         fsync=False)

    def write(self, record: Mapping) -> None:
        """Append one item record (`append`).

        Args:
            record: A mapping with every `ITEM_KEYS` field.
        """
        self.append(record)


def accuracy_summary(run_accuracies: Sequence[float], n: int) -> dict:
    """The summary of a language's runs.

    Args:
        run_accuracies: Accuracy of each run, in percent.
        n: Items a run.

    Returns:
        {"runs", "mean", "std": sample standard deviation (ddof 1; None for one run), "n"}.
    """
    runs = [float(a) for a in run_accuracies]
    mean = sum(runs) / len(runs)
    std = (math.sqrt(sum((a - mean) ** 2 for a in runs) / (len(runs) - 1))
           if len(runs) > 1 else None)
    return {"runs": runs, "mean": mean, "std": std, "n": n}


def read_results(path: str | os.PathLike) -> dict:
    """A results.json (or the folder holding one).

    Args:
        path: The file or its folder.

    Raises:
        ValueError: Not JSON, or no "benchmarks" object.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    results = read_json_file(path)
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), dict):
        raise InputError(f"{path}: not an evaluation results file (no \"benchmarks\" object)")
    return results


def write_results(folder: str | os.PathLike, settings: Mapping, benchmarks: Mapping,
                  complete: bool = True) -> None:
    """Write results.json crash-safely.

    Args:
        folder: The output folder.
        settings: The evaluation's settings (what a resume compares).
        benchmarks: benchmark -> language -> `accuracy_summary`.
        complete: False while some requested (benchmark, language) is not fully answered:
            those are absent from `benchmarks` until a rerun finishes them.
    """
    write_json_atomic(os.path.join(os.fspath(folder), RESULTS_FILE),
                      {"settings": dict(settings), "benchmarks": benchmarks, "complete": complete})


BENCHMARK_TITLES = {"global_mmlu": "Global-MMLU", "belebele": "BELEBELE", "mgsm": "MGSM"}


def table_row(benchmark: str, label: str, per_language: Mapping,
              languages: Sequence[str]) -> str:
    """One Markdown row of the Table-1 shape.

    Args:
        benchmark: The benchmark's name (shown by its title).
        label: The model column's text.
        per_language: language -> `accuracy_summary`.
        languages: The columns, in order.

    Returns:
        The row: `mean ± std` per language (– where absent) and the mean over the languages
        the row has.
    """
    cells, means = [], []
    for language in languages:
        entry = per_language.get(language)
        if entry is None:
            cells.append("–")
            continue
        means.append(entry["mean"])
        std = entry.get("std")
        cells.append(f"{entry['mean']:.2f}" + ("" if std is None else f" ± {std:.2f}"))
    average = f"{sum(means) / len(means):.2f}" if means else "–"
    return ("| " + " | ".join([BENCHMARK_TITLES.get(benchmark, benchmark), label, *cells, average])
            + " |")


def render_table(benchmarks: Mapping, languages: Sequence[str], label: str,
                 runs: int | None = None) -> str:
    """A Markdown table like the paper's Table 1: one row per benchmark, languages as columns.

    Args:
        benchmarks: benchmark -> language -> `accuracy_summary`.
        languages: The columns, in order (`ordered_languages`).
        label: The model column's text.
        runs: Runs per language, named in the note under the table.
    """
    header = ["Benchmark", "Model", *languages, "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_language in benchmarks.items():
        lines.append(table_row(name, label, per_language, languages))
    over = f"over {runs} runs" if runs else "over runs"
    lines += ["", f"Accuracy in percent: mean ± sample standard deviation (ddof 1) {over}; "
                  "Avg. is the mean over the languages shown; – means the benchmark has no such "
                  "language (or it is not fully answered yet)."]
    return "\n".join(lines) + "\n"


# The paper's column order (Table 1): the targets, then the anchors.
LANGUAGE_ORDER = (*PAPER_TARGET_LANGUAGES, *PAPER_ANCHOR_LANGUAGES)


def ordered_languages(languages: Iterable[str]) -> list[str]:
    """The languages in the paper's column order; others after them, sorted.

    Args:
        languages: Language codes (duplicates allowed).
    """
    unique = set(languages)
    return [l for l in LANGUAGE_ORDER if l in unique] + sorted(unique - set(LANGUAGE_ORDER))
