"""The anchor sources the model answers: GSM8K and MMLU-ProX, from the hub or local JSON Lines.

    gsm8k      openai/gsm8k      config main            split train   gold = text after "####"
    mmlu_prox  li-lab/MMLU-ProX  config en / zh / ...    split test    gold = the letter in `answer`

MMLU-ProX publishes only `test` (11,829 questions per language) and `validation` (70); the paper's
"training split" is its test split, which is the default here. Its rows carry `question_id`,
`question`, `option_0` .. `option_9` (null past the last option), `answer` (a letter A-J),
`answer_index`, `cot_content`, `category`, `src`.

`data_dir` reads the same columns from local files instead of the hub (tests, clusters without
network):

    <data_dir>/gsm8k/train.jsonl           GSM8K (English), one hub row per line
    <data_dir>/gsm8k/train.<lang>.jsonl    a translated GSM8K in the same columns (e.g. train.zh.jsonl)
    <data_dir>/mmlu_prox/<lang>.jsonl      MMLU-ProX rows of the chosen split

Sample ids are stable across reruns: `gsm8k-train-00042` (the row index, so a translated GSM8K
with the same row order gives its questions the same ids) and `mmluprox-<lang>-<question_id>`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator, Optional

from sara_megatron.answers import CHOICE_LETTERS, normalize_number
from sara_megatron.io import read_jsonl_objects
from sara_megatron.tool_errors import UserFacingError

SOURCES = ("gsm8k", "mmlu_prox")
GSM8K_HUB = ("openai/gsm8k", "main", "train")
MMLU_PROX_HUB = "li-lab/MMLU-ProX"
MMLU_PROX_DEFAULT_SPLIT = "test"
MMLU_PROX_MAX_OPTIONS = 10


class SourceDataError(UserFacingError, ValueError):
    """A source row that cannot become an anchor sample (names the file or dataset and row)."""


@dataclasses.dataclass(frozen=True)
class AnchorSample:
    """One question of an anchor source, with its gold answer (see the field comments)."""

    id: str
    source: str  # "gsm8k" or "mmlu_prox"
    language: str
    question: str
    options: tuple[str, ...]  # () for GSM8K; "A" .. up to "J" for MMLU-ProX
    gold: str  # the number as text for GSM8K, a letter for MMLU-ProX

    @property
    def is_multiple_choice(self) -> bool:
        """Whether it has options (MMLU-ProX)."""
        return bool(self.options)


def read_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """The rows of a local source file.

    Args:
        path: A JSONL file in the hub's columns.

    Returns:
        An iterator of (line number, object), one a non-blank line; a bad line raises
        SourceDataError naming it.
    """
    return read_jsonl_objects(path, SourceDataError)


def gsm8k_gold(answer: str) -> str:
    """The final answer after GSM8K's `####` marker, thousands separators dropped ("1,000" -> "1000").

    Args:
        answer: GSM8K's `answer` column (the worked solution, then `#### <number>`).

    Raises:
        ValueError: No marker, or no number after it.
    """
    if "####" not in answer:
        raise ValueError("no '####' final-answer marker in the answer")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if normalize_number(gold) is None:
        raise ValueError(f"the text after '####' is not a number: {gold!r}")
    return gold


def gsm8k_sample(index: int, row: dict, language: str) -> AnchorSample:
    """A GSM8K row as an anchor sample.

    Args:
        index: The row's position (the id is `gsm8k-train-<index>`).
        row: The row, in the hub's columns (`question`, `answer`).
        language: The row's language.

    Returns:
        The `AnchorSample` (no options; the gold answer from `gsm8k_gold`).

    Raises:
        ValueError: A column missing or unreadable.
    """
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answer, str):
        raise ValueError("'answer' must be a string ending in '#### <number>'")
    return AnchorSample(id=f"gsm8k-train-{index:05d}", source="gsm8k", language=language,
                        question=question.strip(), options=(), gold=gsm8k_gold(answer))


def mmlu_prox_sample(row: dict, language: str) -> AnchorSample:
    """An MMLU-ProX row as an anchor sample.

    Args:
        row: The row, in the hub's columns (`question_id`, `question`, `option_0` ..
            `option_9`, `answer`, `answer_index`).
        language: The row's language.

    Returns:
        The `AnchorSample` (id `mmluprox-<language>-<question_id>`; 2 to 10 options).

    Raises:
        ValueError: A column missing or unreadable, or an answer that is no option's letter.
    """
    question_id = row.get("question_id")
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)) or \
            str(question_id).strip() == "":
        raise ValueError(f"'question_id' must be an integer or a string, got {question_id!r}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    columns = [row.get(f"option_{i}") for i in range(MMLU_PROX_MAX_OPTIONS)]
    # Questions with fewer than ten options leave the last columns null (or empty).
    while columns and (columns[-1] is None or (isinstance(columns[-1], str) and not columns[-1].strip())):
        columns.pop()
    if len(columns) < 2:
        raise ValueError("needs at least two options in option_0 .. option_9")
    if not all(isinstance(c, str) and c.strip() for c in columns):
        raise ValueError("an option before the last one is missing or not a string")
    options = tuple(str(c).strip() for c in columns)
    answer = row.get("answer")
    if not isinstance(answer, str) or answer.strip().upper() not in CHOICE_LETTERS[:len(options)]:
        raise ValueError(f"'answer' must be one of the {len(options)} option letters, got {answer!r}")
    gold = answer.strip().upper()
    index = row.get("answer_index")
    if isinstance(index, int) and not isinstance(index, bool) and CHOICE_LETTERS[index:index + 1] != gold:
        raise ValueError(f"'answer' {gold} disagrees with 'answer_index' {index}")
    return AnchorSample(id=f"mmluprox-{language}-{str(question_id).strip()}", source="mmlu_prox",
                        language=language, question=question.strip(), options=options, gold=gold)


def _hub_rows(path: str, config: str, split: str) -> Iterable[dict]:
    import datasets  # imported here: reading local files needs no `datasets` start-up

    return datasets.load_dataset(path, config, split=split)


def gsm8k_file(data_dir: str | os.PathLike, language: str) -> str:
    """The local GSM8K file: `<data_dir>/gsm8k/train.jsonl` (en) or `train.<language>.jsonl`.

    Args:
        data_dir: The `--data-dir` folder.
        language: The sample language.
    """
    name = "train.jsonl" if language == "en" else f"train.{language}.jsonl"
    return os.path.join(os.fspath(data_dir), "gsm8k", name)


def mmlu_prox_file(data_dir: str | os.PathLike, language: str) -> str:
    """The local MMLU-ProX file: `<data_dir>/mmlu_prox/<language>.jsonl`.

    Args:
        data_dir: The `--data-dir` folder.
        language: The sample language.
    """
    return os.path.join(os.fspath(data_dir), "mmlu_prox", f"{language}.jsonl")


def _rows(source: str, language: str, data_dir: Optional[str],
          mmlu_prox_split: str) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs: `where` names the file line or hub row in error messages."""
    if data_dir is not None:
        path = gsm8k_file(data_dir, language) if source == "gsm8k" else mmlu_prox_file(data_dir, language)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {source} file for language {language!r}: {path}")
        for line_no, row in read_jsonl_rows(path):
            yield f"{path}:{line_no}", row
        return
    if source == "gsm8k":
        if language != "en":
            raise SourceDataError(
                f"GSM8K on the hub ({GSM8K_HUB[0]}) is English only; give a translated GSM8K "
                f"({language}) as <data-dir>/gsm8k/train.{language}.jsonl in its columns")
        hub, config, split = GSM8K_HUB
    else:
        hub, config, split = MMLU_PROX_HUB, language, mmlu_prox_split
    for index, row in enumerate(_hub_rows(hub, config, split)):
        yield f"{hub}[{config}/{split}] row {index}", row


def load_anchor_samples(source: str, language: str, data_dir: Optional[str] = None,
                        limit: Optional[int] = None,
                        mmlu_prox_split: str = MMLU_PROX_DEFAULT_SPLIT) -> list[AnchorSample]:
    """The anchor samples of one source in one language, in the source's row order.

    GSM8K ids number the rows (blank lines in a local file do not count), so they follow the
    hub's order.

    Args:
        source: "gsm8k" or "mmlu_prox".
        language: The anchor language.
        data_dir: Local files in the hub's columns (None: the hub).
        limit: The first `limit` samples (None: all).
        mmlu_prox_split: The MMLU-ProX split on the hub.

    Returns:
        The samples.

    Raises:
        ValueError: An unknown source or a negative limit.
        FileNotFoundError: No local file for the source and language.
        SourceDataError: A row that cannot be read (named), a duplicate id, or a source
            without any row (an empty file would otherwise be a run with nothing to do).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    samples: list[AnchorSample] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(_rows(source, language, data_dir, mmlu_prox_split)):
        if limit is not None and len(samples) >= limit:
            break
        try:
            sample = (gsm8k_sample(index, dict(row), language) if source == "gsm8k"
                      else mmlu_prox_sample(dict(row), language))
        except ValueError as e:
            raise SourceDataError(f"{where}: {e}") from None
        if sample.id in seen:
            raise SourceDataError(f"{where}: duplicate sample id {sample.id} (first at {seen[sample.id]})")
        seen[sample.id] = where
        samples.append(sample)
    if not samples and limit != 0:
        where = ((gsm8k_file(data_dir, language) if source == "gsm8k"
                  else mmlu_prox_file(data_dir, language)) if data_dir is not None
                 else f"the hub's {GSM8K_HUB[0] if source == 'gsm8k' else MMLU_PROX_HUB}")
        raise SourceDataError(f"{where} holds no {source} samples ({language}): nothing to answer")
    return samples


def parse_sources(text: str) -> tuple[str, ...]:
    """Read a `--sources` value.

    Args:
        text: Comma-separated names, e.g. `gsm8k,mmlu_prox`.

    Returns:
        The names, first occurrence order, duplicates dropped.

    Raises:
        ValueError: None given, or an unknown name.
    """
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in SOURCES]
    if not names or unknown:
        raise ValueError(f"unknown source(s) {unknown or text!r} (known: {', '.join(SOURCES)})")
    return names
