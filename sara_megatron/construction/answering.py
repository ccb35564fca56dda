"""Ask a model to answer the anchor samples over the OpenAI-compatible chat API.

Each sample gets the paper's prompt (Appendix A.7: Table 10 for GSM8K, Table 8 with up to ten
options for MMLU-ProX: analyse, then the final answer in `\\boxed{}`) as one user message. Each
reply is appended to the answers file as soon as it arrives, one JSON object per line:

    {"id", "source", "language", "question", "options", "gold",
     "messages": [the prompt messages], "output": the raw reply, "finish_reason",
     "model", "settings": {ChatSettings fields}, "prompt_version", "attempts",
     "prompt_tokens", "completion_tokens"}

A killed run resumes: a rerun skips the ids already in the file (a torn last line is cut off
first) and refuses a file written with other settings or prompts. A sample whose request failed
for good is not written (so a rerun asks again) and is listed in the failures file instead. When
every sample has its answer the file is rewritten in source order, so a complete file does not
depend on arrival order, concurrency or kills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from typing import Callable, Mapping, Optional, Sequence

from sara_megatron.construction.sources import AnchorSample
from sara_megatron.io import atomic_open
from sara_megatron.jobs import FailurePolicy, JobPool, JsonlRecord, PoolCounts
from sara_megatron.tool_errors import UserFacingError


class AnswersFileError(UserFacingError, ValueError):
    """An existing answers file that this run cannot continue (names the file and line)."""


def prompt_messages(sample: AnchorSample, template_language: str = "en",
                    templates: Optional[Mapping] = None) -> list[dict]:
    """The paper's prompt for a sample, as chat messages (one user turn).

    Args:
        sample: The anchor sample (with options: the multiple-choice prompt, else the math one).
        template_language: The template's language.
        templates: Translated templates (`prompts.load_templates`), for a language other than en.
    """
    from sara_megatron.prompts import math_prompt, multiple_choice_prompt

    if sample.options:
        text = multiple_choice_prompt(sample.question, sample.options, template_language, templates)
    else:
        text = math_prompt(sample.question, template_language, templates)
    return [{"role": "user", "content": text}]


def answer_record(sample: AnchorSample, messages: list[dict], reply, settings,
                  prompt_version: str) -> dict:
    """The record of one answer: a line of the answers file (the fields the module docstring
    lists).

    Args:
        sample: The anchor sample.
        messages: The prompt messages sent.
        reply: The `ChatReply`.
        settings: The request's `ChatSettings`.
        prompt_version: `prompts.PROMPT_VERSION`.
    """
    return {
        "id": sample.id, "source": sample.source, "language": sample.language,
        "question": sample.question, "options": list(sample.options), "gold": sample.gold,
        "messages": messages, "output": reply.content, "finish_reason": reply.finish_reason,
        "model": settings.model, "settings": settings.as_dict(), "prompt_version": prompt_version,
        "attempts": reply.attempts, "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }


def failures_path_for(output: str | os.PathLike) -> str:
    """The failures file beside an answers file: `answers.jsonl` -> `answers.failures.jsonl`.

    Args:
        output: The answers file.
    """
    output = os.fspath(output)
    stem = output[:-len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".failures.jsonl"


def _answer_check(settings_dict: dict, prompt_version: str):
    """The check of one row of an answers file this run continues (see `answers_record`)."""
    def check(path: str, line_no: int, record: dict) -> None:
        if not isinstance(record.get("id"), str):
            raise AnswersFileError(f"{path}:{line_no}: not an answer record")
        if record.get("settings") != settings_dict or record.get("prompt_version") != prompt_version:
            raise AnswersFileError(
                f"{path}:{line_no}: answered with other settings or prompts "
                f"({record.get('settings')}, prompt version {record.get('prompt_version')}); "
                "write to another --output, or rerun with the settings it was made with")
    return check


def answers_record(path: str | os.PathLike, settings_dict: dict, prompt_version: str) -> JsonlRecord:
    """The answers file as a job record, keyed by sample id.

    Args:
        path: The answers JSONL file (need not exist).
        settings_dict: `ChatSettings.as_dict()` of this run; every row must have been made with it.
        prompt_version: `prompts.PROMPT_VERSION`; every row must have been made with it.

    Returns:
        A `JsonlRecord` whose `load` cuts a torn last line (what a kill mid-write leaves) and
        raises AnswersFileError for any other unreadable line, or a row made with other settings
        or another prompt version.
    """
    return JsonlRecord(path, key=lambda record: record["id"],
                       check=_answer_check(settings_dict, prompt_version), error=AnswersFileError)


@dataclasses.dataclass
class AnswerRunReport:
    """What one `answer_samples` run did (its counts are the tool's summary line).

    Attributes:
        samples: Samples given.
        already_done: Samples the answers file held before the run.
        answered: Samples answered by this run.
        failed: Samples whose requests failed for good.
        retries: Requests retried by the client.
        prompt_tokens, completion_tokens: Usage of this run's replies.
        finish_reasons: finish reason -> replies.
        failures: {"id", "source", "reason", "attempts"} of each failed sample.
        complete: Every sample has its answer in the file.
        elapsed_s: Wall time of the run.
    """

    samples: int
    already_done: int
    answered: int
    failed: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: dict
    failures: list[dict]
    complete: bool  # every sample has its answer in the file
    elapsed_s: float

    def as_dict(self) -> dict:
        """The fields, `failures` left out (they are in the failures file)."""
        out = dataclasses.asdict(self)
        out.pop("failures")
        return out

    def request_failures_line(self, failures_path: str) -> Optional[str]:
        """The line on the samples whose requests failed for good (the tool's exit-1 line).

        Args:
            failures_path: The failures file, named in the line.

        Returns:
            The line, or None when no request failed.
        """
        if not self.failures:
            return None
        reason, times = Counter(f["reason"] for f in self.failures).most_common(1)[0]
        return (f"{self.failed} of {self.samples} samples failed on their requests (commonest: "
                f"{reason}, {times}); they are listed in {failures_path} and not in the answers "
                "file; rerun the same command to ask for them again (the answers received stay)")


def _write_in_source_order(path: str, records: list[dict], order: Sequence[str]) -> None:
    rank = {sample_id: i for i, sample_id in enumerate(order)}
    indexed = sorted(enumerate(records), key=lambda p: (rank.get(p[1]["id"], len(rank)), p[0]))
    with atomic_open(path) as f:
        for _, record in indexed:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


async def answer_samples(samples: Sequence[AnchorSample], client, settings,
                         output: str | os.PathLike, *, template_language: str = "en",
                         templates: Optional[Mapping] = None,
                         failures_path: Optional[str] = None,
                         on_progress: Optional[Callable[[PoolCounts], None]] = None,
                         workers: Optional[int] = None) -> AnswerRunReport:
    """Answer every sample not yet in `output`; append each reply as it arrives.

    Args:
        samples: The anchor samples (unique ids), in source order.
        client: A `sara_megatron.chat.ChatClient` (it bounds the requests in flight and retries).
        settings: The `ChatSettings` of every request.
        output: The answers JSONL file, appended to and resumed from.
        template_language: The prompt template's language.
        templates: Translated templates (`prompts.load_templates`), for a language other than en.
        failures_path: Where the samples whose requests failed for good are listed (default:
            `failures_path_for(output)`).
        on_progress: Called with the pool's `PoolCounts` after each sample.
        workers: Samples handed to the client at once (default: its concurrency).

    Returns:
        The `AnswerRunReport`.

    Raises:
        AnswersFileError: `output` holds a line this run cannot continue.
        ValueError: Sample ids are not unique.
    """
    from sara_megatron.chat import ChatRequestFailed
    from sara_megatron.prompts import PROMPT_VERSION

    started = time.monotonic()
    output = os.fspath(output)
    failures_path = failures_path or failures_path_for(output)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids are not unique")
    settings_dict = settings.as_dict()
    finish_reasons: Counter = Counter()
    retries_before = client.stats.retries
    tokens_before = (client.stats.prompt_tokens, client.stats.completion_tokens)

    async def answer(sample: AnchorSample, attempt) -> dict:
        messages = prompt_messages(sample, template_language, templates)
        reply = await client.complete(messages, settings)
        return answer_record(sample, messages, reply, settings, PROMPT_VERSION)

    def answered(sample: AnchorSample, record: dict) -> None:
        finish_reasons[record["finish_reason"]] += 1

    with answers_record(output, settings_dict, PROMPT_VERSION) as record:
        record.load()
        # A sample whose request failed for good is listed, not written: a rerun asks again.
        pool = JobPool(workers or client.concurrency, FailurePolicy.CONTINUE,
                       failures=(ChatRequestFailed,), record=record, key=lambda s: s.id,
                       progress=on_progress)
        result = await pool.run(samples, answer, on_result=answered)
    failures = [{"id": f.job.id, "source": f.job.source, "reason": f.reason,
                 "attempts": f.error.attempts} for f in result.failures]
    counts = result.counts
    complete = not failures
    if complete and counts.done:
        _write_in_source_order(output, list(record.done.values()), ids)
    with atomic_open(failures_path) as f:
        for failure in failures:
            f.write(json.dumps(failure, ensure_ascii=False) + "\n")
    return AnswerRunReport(
        samples=len(samples), already_done=counts.skipped,
        answered=counts.done, failed=counts.failed,
        retries=client.stats.retries - retries_before,
        prompt_tokens=client.stats.prompt_tokens - tokens_before[0],
        completion_tokens=client.stats.completion_tokens - tokens_before[1],
        finish_reasons=dict(finish_reasons), failures=failures, complete=complete,
        elapsed_s=time.monotonic() - started,
    )
