"""The paper's three evaluation benchmarks, from the hub or from local files in the hub's columns.

    global_mmlu  CohereForAI/Global-MMLU  config = language code       split test   (~14k each)
    belebele     facebook/belebele        config = FLORES code          split test   (900 each)
    mgsm         juletxara/mgsm           config = language code        split test   (250 each)

`data_dir` reads `<data_dir>/<benchmark>/<lang>.jsonl` (one hub row per line, the same columns)
instead of the hub: tests and clusters without network use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from sara_megatron.io import read_jsonl_objects, sha256_file
from sara_megatron.prompts import OPTION_LETTERS
from sara_megatron.tool_errors import UserFacingError


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark question in one language (see the field comments)."""

    benchmark: str
    language: str
    # The same question has the same item_id in every language (Global-MMLU: sample_id;
    # BELEBELE: link + question_number; MGSM: row index).
    item_id: str
    question: str
    options: tuple[str, ...]  # () for MGSM
    passage: str | None  # BELEBELE's flores_passage
    gold: str  # "A".."D" for multiple choice, the number as a string for MGSM


BENCHMARK_LANGUAGES: dict[str, tuple[str, ...]] = {
    "global_mmlu": ("en", "zh", "hi", "ne", "bn", "te", "sw"),
    "belebele": ("en", "zh", "hi", "ne", "bn", "te", "sw"),
    "mgsm": ("en", "zh", "bn", "te", "sw"),  # MGSM has no Hindi and no Nepali
}

HUB_DATASETS = {
    "global_mmlu": "CohereForAI/Global-MMLU",
    "belebele": "facebook/belebele",
    "mgsm": "juletxara/mgsm",
}
BELEBELE_CONFIGS = {
    "en": "eng_Latn", "zh": "zho_Hans", "hi": "hin_Deva", "ne": "npi_Deva", "bn": "ben_Beng",
    "te": "tel_Telu", "sw": "swh_Latn",
}
HUB_SPLIT = "test"

# The columns each benchmark's rows must have (the hub's names).
REQUIRED_COLUMNS = {
    "global_mmlu": ("sample_id", "question", "option_a", "option_b", "option_c", "option_d",
                    "answer"),
    "belebele": ("link", "question_number", "flores_passage", "question", "mc_answer1",
                 "mc_answer2", "mc_answer3", "mc_answer4", "correct_answer_num"),
    "mgsm": ("question", "answer_number"),
}


class BenchmarkDataError(UserFacingError, ValueError):
    """A benchmark row or file that cannot be read (names the file and line)."""


def check_benchmark_language(name: str, language: str) -> None:
    """Refuse an unknown benchmark, or a language it does not have.

    Args:
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.

    Raises:
        ValueError: Naming what is known.
    """
    if name not in BENCHMARK_LANGUAGES:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARK_LANGUAGES)})")
    if language not in BENCHMARK_LANGUAGES[name]:
        raise ValueError(f"{name} has no language {language!r} "
                         f"(it has: {' '.join(BENCHMARK_LANGUAGES[name])})")


def hub_config(name: str, language: str) -> str:
    """The hub dataset config of a benchmark's language (BELEBELE's `hin_Deva`, else the code).

    Args:
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.
    """
    return BELEBELE_CONFIGS[language] if name == "belebele" else language


def benchmark_file(data_dir: str | os.PathLike, name: str, language: str) -> str:
    """The local file of a benchmark's language: `<data_dir>/<name>/<language>.jsonl`.

    Args:
        data_dir: The `--data-dir` folder.
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.
    """
    return os.path.join(os.fspath(data_dir), name, f"{language}.jsonl")


def _number_text(value) -> str:
    """MGSM's answer_number as text: 12.0 -> "12", "1,000" stays for normalize_number to read."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value).strip()
    if not text:
        raise ValueError("empty answer_number")
    return text


def item_from_row(name: str, language: str, row: dict, index: int) -> BenchmarkItem:
    """One row, in the hub's columns (`REQUIRED_COLUMNS`), as an item.

    Args:
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.
        row: The row.
        index: Its 0-based position (MGSM's item id).

    Returns:
        The `BenchmarkItem`.

    Raises:
        ValueError: A missing column or a bad answer.
    """
    missing = [c for c in REQUIRED_COLUMNS[name] if row.get(c) is None]
    if missing:
        raise ValueError(f"missing column(s): {', '.join(missing)}")
    if name == "global_mmlu":
        gold = str(row["answer"]).strip().upper()
        if gold not in OPTION_LETTERS[:4]:
            raise ValueError(f"answer must be a letter A-D, got {row['answer']!r}")
        return BenchmarkItem(
            benchmark=name, language=language, item_id=str(row["sample_id"]),
            question=str(row["question"]),
            options=tuple(str(row[f"option_{c}"]) for c in "abcd"), passage=None, gold=gold)
    if name == "belebele":
        try:
            number = int(str(row["correct_answer_num"]).strip())
        except ValueError:
            number = 0
        if not 1 <= number <= 4:
            raise ValueError(f"correct_answer_num must be 1-4, got {row['correct_answer_num']!r}")
        return BenchmarkItem(
            benchmark=name, language=language,
            item_id=f"{row['link']}#{row['question_number']}",
            question=str(row["question"]),
            options=tuple(str(row[f"mc_answer{i}"]) for i in range(1, 5)),
            passage=str(row["flores_passage"]), gold=OPTION_LETTERS[number - 1])
    return BenchmarkItem(
        benchmark=name, language=language, item_id=str(index), question=str(row["question"]),
        options=(), passage=None, gold=_number_text(row["answer_number"]))


def _hub_rows(name: str, language: str):
    """Every row of the hub split (the whole split is downloaded whatever the limit, and the
    fingerprint covers it all, as it covers all of a local file)."""
    import datasets

    try:
        dataset = datasets.load_dataset(HUB_DATASETS[name], hub_config(name, language),
                                        split=HUB_SPLIT)
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all say the same to a user
        raise BenchmarkDataError(
            f"{HUB_DATASETS[name]} ({hub_config(name, language)}): could not load it from the "
            f"hub ({type(e).__name__}: {e}); --data-dir reads local files in the hub's columns"
        ) from None
    return list(dataset)


def rows_fingerprint(rows) -> str:
    """The fingerprint of a hub split's content.

    Args:
        rows: The split's rows, in order.

    Returns:
        `sha256-rows:` + the sha256 over the rows' canonical JSON lines.
    """
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return "sha256-rows:" + h.hexdigest()


@dataclass(frozen=True)
class BenchmarkSource:
    """The items of one benchmark and language, where they were read, and a fingerprint of that
    source's whole content (a local file's sha256, or the hub rows'): a resume compares it."""

    items: list[BenchmarkItem]
    source: str
    fingerprint: str


def load_benchmark(name: str, language: str, data_dir: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[BenchmarkItem]:
    """The items of one benchmark in one language, in the source's order.

    Args:
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.
        data_dir: Local files in the hub's columns (None: the hub).
        limit: The first `limit` rows (None: all).

    Raises:
        As `load_benchmark_source`.
    """
    return load_benchmark_source(name, language, data_dir, limit, fingerprint=False).items


def load_benchmark_source(name: str, language: str, data_dir: str | os.PathLike | None = None,
                          limit: int | None = None, *, fingerprint: bool = True
                          ) -> BenchmarkSource:
    """`load_benchmark`, with where the items came from and the source's fingerprint.

    Args:
        name: "global_mmlu", "belebele" or "mgsm".
        language: The language code.
        data_dir: Local files in the hub's columns (None: the hub).
        limit: The first `limit` rows (None: all).
        fingerprint: Compute the fingerprint (it reads the whole source); False leaves it "".

    Returns:
        The `BenchmarkSource`.

    Raises:
        ValueError: An unknown benchmark or language, or a limit below 1.
        FileNotFoundError: No local file.
        BenchmarkDataError: A row that cannot be read (file:line), or the hub unreachable.
    """
    check_benchmark_language(name, language)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if data_dir is not None:
        source = benchmark_file(data_dir, name, language)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no benchmark file {source} (expected "
                                    f"<data-dir>/{name}/{language}.jsonl in the hub's columns)")
        digest = "sha256:" + sha256_file(source) if fingerprint else ""
        rows = read_jsonl_objects(source, BenchmarkDataError, limit)
    else:
        source = f"{HUB_DATASETS[name]} ({hub_config(name, language)})"
        hub_rows = _hub_rows(name, language)
        digest = rows_fingerprint(hub_rows) if fingerprint else ""
        rows = enumerate(hub_rows[:limit], start=1)
    items, seen = [], {}
    for line_number, row in rows:
        try:
            item = item_from_row(name, language, row, index=line_number - 1)
        except ValueError as e:
            raise BenchmarkDataError(f"{source}:{line_number}: {e}") from None
        # A repeated id (two rows with one link and question number) gets its occurrence as a
        # suffix: the languages list their rows in the same order, so ids still pair up.
        count = seen.get(item.item_id, 0) + 1
        seen[item.item_id] = count
        if count > 1:
            item = dataclasses.replace(item, item_id=f"{item.item_id}~{count}")
        items.append(item)
    if not items:
        raise BenchmarkDataError(f"{source}: no items")
    return BenchmarkSource(items, source, digest)
