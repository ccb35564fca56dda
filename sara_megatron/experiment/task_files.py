"""The experiment's files: the training corpora (the parallel corpus format) and the held-out
evaluation items as local benchmark files that `tools/evaluate.py --data-dir` reads.

Held-out arithmetic is written in MGSM's columns (`DIR/mgsm/<lang>.jsonl`: `question`,
`answer_number`; the item id is the row index, the same in every language) and held-out lookups
in Global-MMLU's (`DIR/global_mmlu/<lang>.jsonl`: `sample_id`, `question`, `option_a..d`,
`answer`), so the evaluation runs the paper's prompts and scoring unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sara_megatron.evaluation.benchmarks import BenchmarkItem
from sara_megatron.evaluation.tasks import item_prompt
from sara_megatron.experiment.task import (
    ANCHOR, FACT_WORDS, LANGUAGES, TaskItem, TaskSettings, lookup_items, render_sentence,
    world_facts)
from sara_megatron.io import atomic_open

MATH_BENCHMARK, LOOKUP_BENCHMARK = "mgsm", "global_mmlu"


def benchmark_item(item: TaskItem, language: str) -> BenchmarkItem:
    """The item as the evaluation sees it (so training prompts are the evaluation's prompts).

    Args:
        item: The task item.
        language: A code of `LANGUAGES`.
    """
    if item.kind == "math":
        return BenchmarkItem(MATH_BENCHMARK, language, item.item_id, item.question(language), (),
                             None, item.answer)
    return BenchmarkItem(LOOKUP_BENCHMARK, language, item.item_id, item.question(language),
                         item.option_texts(language), None, item.answer)


def task_record(item: TaskItem, language: str) -> dict:
    """The item as a corpus sample: the evaluation's prompt (user) and the worked answer
    (assistant).

    Args:
        item: The task item.
        language: A code of `LANGUAGES`.

    Returns:
        The record (id, lang, source, answer, messages).
    """
    return {"id": item.item_id, "lang": language, "source": f"experiment-{item.kind}",
            "answer": item.answer,
            "messages": [{"role": "user", "content": item_prompt(benchmark_item(item, language))},
                         {"role": "assistant", "content": item.response(language)}]}


def text_record(sample_id: str, language: str, text: str) -> dict:
    """Plain text as a sample (the loss covers the text): what a pretrained model has read.

    Args:
        sample_id: The sample's id.
        language: The text's language code.
        text: The text, the assistant turn.

    Returns:
        The record (id, lang, source, messages).
    """
    return {"id": sample_id, "lang": language, "source": "experiment-text",
            "messages": [{"role": "user", "content": "text"},
                         {"role": "assistant", "content": text}]}


def write_jsonl(path: Path, records) -> int:
    """Write records as JSON lines, atomically (parent folders created).

    Args:
        path: The file to write.
        records: JSON-serialisable dicts.

    Returns:
        The number of records written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_corpus(folder: Path, by_language: dict[str, list[dict]]) -> list[str]:
    """Write one `<lang>.jsonl` per language.

    Args:
        folder: The corpus folder.
        by_language: language -> its records.

    Returns:
        The paths written, in the order of `by_language`.
    """
    paths = []
    for lang, records in by_language.items():
        write_jsonl(folder / f"{lang}.jsonl", records)
        paths.append(os.fspath(folder / f"{lang}.jsonl"))
    return paths


def base_corpus_records(task_items: list[TaskItem], text_items: list[TaskItem], task: TaskSettings,
                        fact_copies: int = 1, languages=LANGUAGES) -> dict[str, list[dict]]:
    """The base model's data: the task in the anchor only, every world fact stated in the anchor
    (`fact_copies` times), and plain text in every language — the story sentences of
    `text_items` and every lookup question, neither with its answer — so the base has read the
    targets' words (as a pretrained model has read some of every language) without being shown
    a target-language answer or fact.

    Args:
        task_items: The anchor task items (with answers).
        text_items: Items whose questions are plain text in every language.
        task: The task's settings (the world).
        fact_copies: How many times each fact is stated.
        languages: The corpus's languages (the anchor among them).

    Returns:
        language -> its records.
    """
    records = {lang: [] for lang in languages}
    records[ANCHOR] += [task_record(i, ANCHOR) for i in task_items]
    for copy in range(fact_copies):
        for person, attributes in world_facts(task.world_seed, task.people).items():
            for attribute, value in attributes.items():
                records[ANCHOR].append(text_record(
                    f"fact-{person}-{attribute}-{copy}", ANCHOR,
                    render_sentence(FACT_WORDS[attribute], ANCHOR, {"p": person, "v": value})))
    questions = lookup_items(task, "text")
    for item in list(text_items) + questions:
        for lang in languages:
            records[lang].append(text_record(f"text-{item.item_id}", lang, item.question(lang)))
    return records


def parallel_corpus_records(items: list[TaskItem], languages=LANGUAGES) -> dict[str, list[dict]]:
    """The fine-tuning corpus: every item in the anchor and each target (translations exact).

    Args:
        items: The fine-tuning items.
        languages: The corpus's languages.

    Returns:
        language -> its records, item by item in the same order.
    """
    return {lang: [task_record(i, lang) for i in items] for lang in languages}


def benchmark_row(item: TaskItem, language: str) -> dict:
    """The item as a benchmark file's row: MGSM's columns for arithmetic, Global-MMLU's for
    lookups.

    Args:
        item: The task item.
        language: A code of `LANGUAGES`.
    """
    if item.kind == "math":
        return {"question": item.question(language), "answer_number": int(item.answer)}
    options = item.option_texts(language)
    return {"sample_id": item.item_id, "question": item.question(language),
            **{f"option_{c}": o for c, o in zip("abcd", options)}, "answer": item.answer}


def write_benchmarks(data_dir: Path, math_items: list[TaskItem], lookup_items: list[TaskItem],
                     languages=LANGUAGES) -> None:
    """Write the held-out items as `<data_dir>/{mgsm,global_mmlu}/<lang>.jsonl`.

    Args:
        data_dir: The benchmarks folder (`tools/evaluate.py --data-dir`).
        math_items: The arithmetic items (row index = item id).
        lookup_items: The lookup items.
        languages: The languages written.
    """
    for benchmark, items in ((MATH_BENCHMARK, math_items), (LOOKUP_BENCHMARK, lookup_items)):
        for lang in languages:
            write_jsonl(data_dir / benchmark / f"{lang}.jsonl",
                        (benchmark_row(i, lang) for i in items))
