"""The correctness filter: keep the anchor samples the model answered right, as corpus records.

Input: the answers file of `tools/answer_anchors.py`, one JSON object per line with at least

    {"id", "source", "language", "question", "options": [...], "messages": [prompt messages],
     "output": the model's raw reply, "gold", "finish_reason"}

A sample is kept when its reply ran to completion and its last `\\boxed{}` equals the gold answer
(an option letter for multiple choice, a number within 1e-6 relative otherwise;
`sara_megatron.answers`). Each dropped sample gets exactly one reason, checked in this order:

    contaminated  its question overlaps an evaluation question (`decontamination`, when enabled)
    truncated     finish_reason == "length": the reply was cut by the token limit
    no_boxed      no complete \\boxed{} (or an empty one)
    wrong         the boxed answer differs from the gold answer
    duplicate     the id appeared earlier in the input (the first one is judged)

A kept sample becomes a parallel-corpus record of the anchor language (`data/corpus_format.py`):
the prompt messages, then the verified reply as the assistant message, `answer` = gold.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterable, Iterator, Optional

from sara_megatron.answers import answer_is_correct, last_boxed
from sara_megatron.construction.decontamination import ContaminationIndex
from sara_megatron.data.corpus_format import RecordError, parse_record
from sara_megatron.data.languages import known_languages
from sara_megatron.io import read_jsonl_objects
from sara_megatron.tool_errors import UserFacingError

CONTAMINATED = "contaminated"
TRUNCATED = "truncated"
NO_BOXED = "no_boxed"
WRONG = "wrong"
DUPLICATE = "duplicate"
DROP_REASONS = (CONTAMINATED, TRUNCATED, NO_BOXED, WRONG, DUPLICATE)
# Replies the filter could not judge: too many of them mean a setting is wrong, not the model.
UNJUDGED_REASONS = (TRUNCATED, NO_BOXED)

_REQUIRED_STRINGS = ("id", "source", "language", "output", "gold")


class AnswerRecordError(UserFacingError, ValueError):
    """An answers-file line that cannot be judged (names the file and line)."""


def check_answer_record(obj, where: str) -> dict:
    """Check that a parsed line has the fields the filter reads.

    Args:
        obj: The parsed line.
        where: `file:line`, for the message.

    Returns:
        `obj`, unchanged.

    Raises:
        AnswerRecordError: A field missing or of the wrong type (named).
    """
    if not isinstance(obj, dict):
        raise AnswerRecordError(f"{where}: a record must be a JSON object")
    for key in _REQUIRED_STRINGS:
        if not isinstance(obj.get(key), str):
            raise AnswerRecordError(f"{where}: '{key}' must be a string, got {obj.get(key)!r}")
    messages = obj.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise AnswerRecordError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    options = obj.get("options", [])
    if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
        raise AnswerRecordError(f"{where}: 'options' must be a list of strings")
    if obj.get("finish_reason") is not None and not isinstance(obj["finish_reason"], str):
        raise AnswerRecordError(f"{where}: 'finish_reason' must be a string or null")
    return obj


def read_answer_records(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    """The records of answers files, in file and line order.

    Args:
        paths: Answers JSONL files (`answer_anchors.py`'s output).

    Yields:
        Each record, checked by `check_answer_record`.

    Raises:
        AnswerRecordError: A line that is not a JSON object or lacks a field (a torn last line
            included: here it is an error to fix, not a sample to skip).
    """
    for path in paths:
        # A run killed mid-write leaves at most a torn last line; the answering tool drops it on
        # resume, and here it is an error to fix, not a sample to skip.
        for line_no, obj in read_jsonl_objects(path, AnswerRecordError):
            yield check_answer_record(obj, f"{os.fspath(path)}:{line_no}")


def judge(record: dict) -> tuple[Optional[str], Optional[str]]:
    """Judge one answer.

    Args:
        record: An answer record.

    Returns:
        (drop reason: `truncated`, `no_boxed` or `wrong`, or None when correct; the answer
        extracted from the output, or None).
    """
    if record.get("finish_reason") == "length":
        return TRUNCATED, last_boxed(record["output"])
    extracted = last_boxed(record["output"])
    if not extracted:
        return NO_BOXED, extracted
    if not answer_is_correct(extracted, record["gold"], record.get("options") or None):
        return WRONG, extracted
    return None, extracted


def corpus_record(record: dict) -> dict:
    """The kept sample as a parallel-corpus record (`data/corpus_format.py`).

    Args:
        record: An answer record judged correct.

    Returns:
        {"id", "lang", "source", "answer", "messages"}: the prompt, then the reply as the
        assistant turn.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    messages.append({"role": "assistant", "content": record["output"]})
    return {"id": record["id"], "lang": record["language"], "source": record["source"],
            "answer": record["gold"], "messages": messages}


@dataclasses.dataclass
class FilterResult:
    """What `filter_answers` kept and dropped (see the field comments)."""

    kept: list[dict]  # corpus records, in input order
    dropped: list[dict]  # {id, source, language, reason, extracted, gold, ...}
    counts: dict[str, collections.Counter]  # source -> Counter(total, kept, <reason>...)

    def summary(self) -> dict:
        """The counts: total, kept and dropped by reason, overall and by source."""
        by_source = {}
        for source, c in sorted(self.counts.items()):
            by_source[source] = {
                "total": c["total"], "kept": c["kept"],
                "kept_share": round(c["kept"] / c["total"], 4) if c["total"] else 0.0,
                "dropped": {reason: c[reason] for reason in DROP_REASONS},
            }
        totals = collections.Counter()
        for c in self.counts.values():
            totals.update(c)
        return {
            "total": totals["total"], "kept": totals["kept"],
            "dropped": {reason: totals[reason] for reason in DROP_REASONS},
            "by_source": by_source,
        }

    def problems(self, max_rejected_fraction: float) -> list[str]:
        """One line per way the answers fell short (empty when they did not): nothing kept at all,
        and each source whose share of replies that could not be judged (cut by the length limit,
        or without a complete `\\boxed{}`) passed `max_rejected_fraction`. Wrong answers are what
        the filter is for, contaminated and duplicate samples are facts of the data: neither
        counts.

        Args:
            max_rejected_fraction: The largest share of unjudged replies a source may have.

        Returns:
            The lines (the tool prints each and exits 1 when there is any).
        """
        s = self.summary()
        lines = []
        if s["total"] and not s["kept"]:
            reason, times = max(s["dropped"].items(), key=lambda item: item[1])
            lines.append(f"kept none of the {s['total']} samples (commonest reason: {reason}, "
                         f"{times}): the output corpus is empty")
        for source, c in s["by_source"].items():
            unjudged = {r: c["dropped"][r] for r in UNJUDGED_REASONS if c["dropped"][r]}
            judged = c["total"] - c["dropped"][CONTAMINATED] - c["dropped"][DUPLICATE]
            count = sum(unjudged.values())
            if judged and count / judged > max_rejected_fraction:
                reason, times = max(unjudged.items(), key=lambda item: item[1])
                lines.append(f"{source}: {count} of {judged} replies ({count / judged:.1%}) could "
                             "not be judged (cut by the length limit, or no \\boxed{} answer), above "
                             f"--max-rejected-fraction {max_rejected_fraction:g} (commonest: "
                             f"{reason}, {times}); check the model's replies (its --max-tokens, "
                             "its thinking), or raise the limit")
        return lines

    def format_summary(self) -> str:
        """The summary as lines for a person: kept of total, then per source."""
        s = self.summary()
        lines = [f"kept {s['kept']} of {s['total']} samples"]
        for source, c in s["by_source"].items():
            reasons = ", ".join(f"{r}={n}" for r, n in c["dropped"].items() if n)
            lines.append(f"  {source}: kept {c['kept']}/{c['total']} ({100 * c['kept_share']:.1f}%)"
                         + (f"; dropped {reasons}" if reasons else ""))
        return "\n".join(lines)


def filter_answers(records: Iterable[dict],
                   contamination: Optional[ContaminationIndex] = None) -> FilterResult:
    """Judge every answer record; the kept ones become corpus records checked against the corpus
    format (a record the format rejects is a bug here, so it raises).

    Args:
        records: Answer records (`read_answer_records`), of one anchor language.
        contamination: Benchmark n-grams; a record overlapping one is dropped as contaminated.

    Returns:
        The `FilterResult`.

    Raises:
        AnswerRecordError: Records of several languages, or a kept record the corpus format
            rejects.
    """
    known = known_languages()
    kept, dropped = [], []
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seen: set[str] = set()
    languages: set[str] = set()
    for record in records:
        source = record["source"]
        counts[source]["total"] += 1
        languages.add(record["language"])
        if len(languages) > 1:
            raise AnswerRecordError(
                f"answers of several anchor languages ({', '.join(sorted(languages))}): filter "
                "each language into its own corpus")
        extracted: Optional[str] = None
        extra: dict = {}
        if record["id"] in seen:
            reason = DUPLICATE
        else:
            seen.add(record["id"])
            reason = None
            if contamination is not None:
                # The prompt holds the question too (plus template words no benchmark shares).
                question = record.get("question") or record["messages"][-1]["content"]
                hit = contamination.match(record["language"], question)
                if hit is not None:
                    reason = CONTAMINATED
                    extra = {"benchmark": hit.benchmark, "benchmark_item": hit.item_id,
                             "shared": hit.shared}
            if reason is None:
                reason, extracted = judge(record)
        if reason is None:
            out = corpus_record(record)
            try:
                parse_record(json.dumps(out, ensure_ascii=False), known)
            except RecordError as e:
                raise AnswerRecordError(f"sample {record['id']}: not a valid corpus record: {e}") from None
            kept.append(out)
            counts[source]["kept"] += 1
        else:
            counts[source][reason] += 1
            dropped.append({"id": record["id"], "source": source, "language": record["language"],
                            "reason": reason, "extracted": extracted, "gold": record["gold"],
                            "finish_reason": record.get("finish_reason"), **extra})
    return FilterResult(kept=kept, dropped=dropped, counts=dict(counts))
