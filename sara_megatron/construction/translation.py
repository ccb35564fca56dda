"""Translate an anchor-language corpus into target languages over the OpenAI wire format.

One *job* is a (record, target language) pair; it becomes one request carrying every message of
the interaction as a JSON object (or, with `split_messages`, one plain-text request per message;
see `translation_wire`). Each reply is checked (`translation_checks`); a rejected reply is asked
again with a stricter instruction naming the problem, up to `max_retries` times, then the job
goes to the failures file — never into the corpus.

Never paying twice: every reply is committed to the SQLite cache the moment it arrives, keyed by
(model, prompt version, target language, system + user content, settings, attempt). A rerun walks
each job through the cache — a cached reply is checked again, a rejected one leads to the next
attempt's key — and requests only what is missing. `--batch` fills the same cache through the
Batch API (`translation_batch`), in rounds: each round submits the next missing attempt of every
unfinished job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from sara_megatron.answers import last_boxed
from sara_megatron.chat.cache import ReplyCache, request_key
from sara_megatron.chat.client import ChatClient, ChatRequestFailed, ChatSettings, is_reasoning_model
from sara_megatron.construction.translation_checks import (
    LanguageIdentifier, check_finish_reason, check_translation,
)
from sara_megatron.construction.translation_cost import PriceTable, context_tokens, estimate_tokens
from sara_megatron.construction.translation_wire import (
    PROMPT_VERSION, message_key, parse_reply, response_format, system_instructions, user_content,
)
from sara_megatron.data.corpus_format import (
    TRANSLATION_FAILURES_FILE,
    ParallelRecord,
    RecordError,
    parse_record,
)
from sara_megatron.data.languages import known_languages
from sara_megatron.io import atomic_open, sha256_file
from sara_megatron.jobs import Attempt, FailurePolicy, Halt, JobFailure, JobPool, ProgressBar, Rejected
from sara_megatron.tool_errors import InputError, UserFacingError

log = logging.getLogger(__name__)
FAILURES_FILE = TRANSLATION_FAILURES_FILE
CACHE_FILE = "translations.sqlite"
# The record, in the output folder, of the input and settings its corpus is made from.
PLAN_FILE = "translation_plan.json"
PLAN_FORMAT = "sara-translation-plan/1"
REQUEST_FAILED = "request_failed"
# Outcomes that are neither a translation nor a verdict of the checks.
UNJUDGED = ("cost_limit", "not_run")


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """Everything one translation run is asked (the tool's flags; see the field comments and
    `tools/translate_corpus.py --help` for each)."""

    input_path: str
    output_dir: str
    languages: tuple[str, ...]
    model: str
    base_url: str | None = None
    cache_path: str | None = None          # default: <output_dir>/translations.sqlite
    concurrency: int = 16
    max_retries: int = 6
    dry_run: bool = False
    max_cost_usd: float | None = None
    batch: bool = False
    split_messages: bool = False
    structured_output: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    seed: int | None = None
    prices_path: str | None = None
    timeout_s: float = 600.0
    batch_poll_s: float = 30.0
    extra_languages: tuple[str, ...] = ()
    progress: bool = True
    api_key_env: str | None = None         # see chat.client.api_key_for
    # Per target language: pairs rejected by the checks, as a share of the pairs judged, above
    # which the run counts as failed (translators miss a few; a broken one misses most).
    max_rejected_fraction: float = 0.05
    # Tokens a request may hold, prompt + expected reply (default: the model's context window,
    # `translation_cost.context_tokens`); a sample with a longer request is refused.
    max_context_tokens: int | None = None

    @property
    def context_limit(self) -> int:
        """The tokens a request may hold (`max_context_tokens`, else the model's window)."""
        return self.max_context_tokens or context_tokens(self.model)

    @property
    def context_source(self) -> str:
        """Where `context_limit` comes from, in words for a message."""
        return ("--max-context-tokens" if self.max_context_tokens
                else f"the context window of {self.model}; --max-context-tokens sets another")

    @property
    def cache_file(self) -> str:
        """The reply cache: `cache_path`, else `<output_dir>/translations.sqlite`."""
        return self.cache_path or os.path.join(self.output_dir, CACHE_FILE)

    def settings(self) -> ChatSettings:
        """The requests' `ChatSettings` (a reasoning model's effort defaults to "low")."""
        effort = self.reasoning_effort
        if effort is None and is_reasoning_model(self.model):
            effort = "low"  # translation needs little thinking; the family requires the field
        return ChatSettings(self.model, temperature=self.temperature, top_p=self.top_p,
                            max_tokens=self.max_tokens, seed=self.seed, reasoning_effort=effort)


def translation_plan(config: TranslationConfig, anchor: str) -> dict:
    """What the corpus in the output folder is made from: the input's content (not its path) and
    every setting that changes a reply. Languages are not part of it (a rerun may add or drop
    one), nor are limits that only decide how far a run goes (retries, cost, concurrency).

    Args:
        config: The run's config.
        anchor: The input's language.

    Returns:
        The plan, written to `translation_plan.json` and compared by `io.check_output_plan`.
    """
    return {
        "format": PLAN_FORMAT,
        "input": {"sha256": sha256_file(config.input_path),
                  "bytes": os.path.getsize(config.input_path)},
        "anchor_language": anchor,
        "model": config.model,
        "prompt_version": PROMPT_VERSION,
        "settings": config.settings().as_dict(),
        "split_messages": config.split_messages,
        "structured_output": config.structured_output,
    }


class CostLimitReached(Halt):
    """A request would pass `max_cost_usd`: the run stops before sending it."""


MAX_NAMED_SAMPLES = 10
CONTEXT_RULE = ("a request's estimated tokens (UTF-8 bytes / 4 of its system and user messages, "
                "plus the expected reply: the source's tokens times the target language's "
                "expansion, and reasoning) must not pass")


class SamplesTooLong(UserFacingError, ValueError):
    """Samples with a request that cannot fit the model's context (named); refused before any
    request, as nothing could be paid for them.

    Args:
        too_long: (sample id, estimated tokens) of each, in input order (the first 10 named).
        config: The run's config (its context limit and where it comes from are named).
    """

    def __init__(self, too_long: list[tuple[str, int]], config: TranslationConfig):
        shown = ", ".join(f"{sample_id} (~{tokens} tokens)"
                          for sample_id, tokens in too_long[:MAX_NAMED_SAMPLES])
        more = (f", and {len(too_long) - MAX_NAMED_SAMPLES} more"
                if len(too_long) > MAX_NAMED_SAMPLES else "")
        super().__init__(f"{len(too_long)} sample(s) too long for the model's context, refused "
                         f"before any request: {shown}{more}; the rule: {CONTEXT_RULE} "
                         f"{config.context_limit} ({config.context_source}); shorten or drop "
                         "them from --input, or raise --max-context-tokens")
        self.samples = [sample_id for sample_id, _ in too_long]


class RunRefused(UserFacingError, ValueError):
    """An error that every request of the run would meet (bad key, unknown model, no quota):
    the run stops instead of listing every pair as failed."""


RUN_STOPPING_ERRORS = ("http_401", "http_403", "http_404", "insufficient_quota")


@dataclasses.dataclass(frozen=True)
class Unit:
    """The texts of one request: a job's messages (all of them, or one with split_messages)."""
    job: int
    language: str
    texts: dict          # key -> source text, in message order

    @property
    def keys(self) -> list[str]:
        """The texts' keys, in message order."""
        return list(self.texts)


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of a unit's attempt, as sent and as cached.

    Attributes:
        unit: The texts it carries.
        attempt: 0 for the first, then each stricter retry.
        key: Its cache key (`chat.cache.request_key`).
        messages: The system and user messages.
        settings: Its `ChatSettings` (with structured output: the response format).
    """

    unit: Unit
    attempt: int
    key: str
    messages: list
    settings: ChatSettings

    def body(self) -> dict:
        """The JSON body as sent (extra_body merged), for the Batch API's request file."""
        kwargs = self.settings.request_kwargs()
        body = {"messages": self.messages, **{k: v for k, v in kwargs.items() if k != "extra_body"}}
        body.update(kwargs.get("extra_body") or {})
        return body


def read_anchor_records(path: str, extra_languages=()) -> list[ParallelRecord]:
    """The input corpus: one language, valid records, unique ids.

    Args:
        path: The anchor corpus JSONL (`data/corpus_format.py`).
        extra_languages: Language codes accepted beside the known ones.

    Returns:
        The records, in file order.

    Raises:
        ValueError: The first problem, named by file:line (or an empty file).
    """
    known = known_languages(extra_languages)
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, known)
            except RecordError as e:
                raise InputError(f"{path}:{line_no}: {e}") from None
            if record.sample_id in seen:
                raise InputError(f"{path}:{line_no}: duplicate id {record.sample_id!r}")
            if records and record.language != records[0].language:
                raise InputError(f"{path}:{line_no}: language {record.language!r}; the input must "
                                 f"be one anchor language ({records[0].language!r} so far)")
            seen.add(record.sample_id)
            records.append(record)
    if not records:
        raise InputError(f"{path} holds no records")
    return records


def record_dict(record: ParallelRecord, language: str, contents: list[str] | None = None) -> dict:
    """A corpus line of a record in one language.

    Args:
        record: The anchor record.
        language: The line's language code.
        contents: The translated message contents, in message order (None: the record's own).

    Returns:
        {"id", "lang", "source", "answer" (when the record has one), "messages"}.
    """
    messages = [{"role": m.role, "content": m.content if contents is None else contents[i]}
                for i, m in enumerate(record.messages)]
    out = {"id": record.sample_id, "lang": language, "source": record.source}
    if record.answer is not None:
        out["answer"] = record.answer
    out["messages"] = messages
    return out


class TranslationRun:
    """The state of one translation run: its jobs (record, target language), the units they
    send, the outcomes and the counts of the summary. `run_streaming` or the Batch API rounds
    (`translation_batch.run_batches`) drive it; `write_outputs` writes the corpus.

    Args:
        config: The run's config.
        records: The anchor records (`read_anchor_records`).
        cache: The reply cache (None until the run opens it; a dry run may have none).
    """

    def __init__(self, config: TranslationConfig, records: list[ParallelRecord],
                 cache: ReplyCache | None):
        self.config = config
        self.records = records
        self.anchor = records[0].language
        self.cache = cache
        self.settings = config.settings()
        self.prices = PriceTable(config.prices_path)
        self.identifier = LanguageIdentifier((self.anchor, *config.languages))
        self.jobs = [(r, lang) for r in range(len(records)) for lang in config.languages]
        self.units = {job: self._units(job) for job in range(len(self.jobs))}
        # Outcomes and counters of this run.
        self.results: dict[int, list[str]] = {}
        self.failures: dict[int, str] = {}
        self.fresh_keys: set[str] = set()       # replies this run received
        self.counted_cached: set[str] = set()   # cached replies this run used
        self.retried_keys: set[str] = set()     # fresh replies rejected with attempts left
        self.request_errors: dict[str, str] = {}  # batch lines that came back without a reply
        self.request_error_counts: dict[str, int] = {}
        self.requested = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.spent_usd = 0.0
        self.in_flight_usd = 0.0
        self.client: ChatClient | None = None

    # -- requests -----------------------------------------------------------------------------------

    def _units(self, job: int) -> list[Unit]:
        record, language = self.records[self.jobs[job][0]], self.jobs[job][1]
        texts = {message_key(i, m.role): m.content for i, m in enumerate(record.messages)}
        if self.config.split_messages:
            return [Unit(job, language, {k: v}) for k, v in texts.items()]
        return [Unit(job, language, texts)]

    def plan(self, unit: Unit, attempt: int, rejection: str | None) -> PlannedRequest:
        """The request of one attempt of a unit.

        Args:
            unit: The texts to send.
            attempt: 0 for the first, then each stricter retry (part of the cache key).
            rejection: Why the previous attempt was rejected (named in the instructions).

        Returns:
            The `PlannedRequest`.
        """
        keys = unit.keys if len(unit.texts) > 1 else None
        boxed = None
        if rejection in ("lost_boxed", "wrong_boxed"):
            boxed = next((b for b in map(last_boxed, reversed(list(unit.texts.values()))) if b), None)
        system = system_instructions(self.anchor, unit.language, keys, rejection, boxed)
        user = user_content(unit.texts)
        settings = self.settings
        if keys and self.config.structured_output:
            settings = dataclasses.replace(settings, extra_body={"response_format": response_format(keys)})
        key = request_key(model=self.config.model, prompt_version=PROMPT_VERSION,
                          language=unit.language, content={"system": system, "user": user},
                          settings=settings.as_dict(), attempt=attempt)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return PlannedRequest(unit, attempt, key, messages, settings)

    def judge(self, unit: Unit, reply) -> tuple[str | None, dict | None]:
        """Check one reply of a unit (`translation_checks`).

        Args:
            unit: The texts that were sent.
            reply: The reply (a `ChatReply` or `CachedReply`).

        Returns:
            (rejection reason or None, the translated texts by key or None).
        """
        reason = check_finish_reason(reply.finish_reason)
        if reason is not None:
            return reason, None
        parsed = parse_reply(reply.content, unit.keys, list(unit.texts.values()))
        if parsed is None:
            return "unparsable_reply", None
        for k, source in unit.texts.items():
            reason = check_translation(source, parsed[k], unit.language, self.identifier)
            if reason is not None:
                return reason, None
        return None, parsed

    def walk(self, unit: Unit) -> tuple[str, object]:
        """Follow a unit through the cache, attempt after attempt, as far as replies are stored.

        Args:
            unit: The texts to send.

        Returns:
            ("done", texts), ("failed", reason) or ("request", PlannedRequest) for the first
            attempt whose reply is missing.
        """
        rejection = None
        for attempt in range(self.config.max_retries + 1):
            planned = self.plan(unit, attempt, rejection)
            reply = self.cache.get(planned.key) if self.cache is not None else None
            if reply is None:
                if self.request_error_counts.get(planned.key, 0) > self.config.max_retries:
                    return "failed", f"request_failed:{self.request_errors[planned.key]}"
                return "request", planned
            if planned.key not in self.fresh_keys and planned.key not in self.counted_cached:
                self.counted_cached.add(planned.key)
            rejection, parsed = self.judge(unit, reply)
            if rejection is None:
                return "done", parsed
            if planned.key in self.fresh_keys and attempt < self.config.max_retries:
                self.retried_keys.add(planned.key)
        return "failed", rejection

    def store(self, planned: PlannedRequest, reply) -> None:
        """Commit a fresh reply to the cache and count its tokens and cost.

        Args:
            planned: The request it answers.
            reply: The `ChatReply` (or a batch line's `CachedReply`).
        """
        self.cache.put(planned.key, reply, model=self.config.model,
                       language=planned.unit.language, attempt=planned.attempt)
        self.fresh_keys.add(planned.key)
        self.requested += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.spent_usd += self.prices.cost(self.config.model, reply.prompt_tokens,
                                           reply.completion_tokens, batch=self.config.batch)

    def estimated_tokens(self, planned: PlannedRequest) -> tuple[int, int]:
        """The tokens expected for a request (`translation_cost.estimate_tokens`).

        Args:
            planned: The request.

        Returns:
            (prompt tokens, completion tokens).
        """
        return estimate_tokens(
            planned.messages[0]["content"], planned.messages[1]["content"], planned.unit.language,
            self.settings.reasoning_effort, is_reasoning_model(self.config.model))

    def over_context(self) -> list[tuple[str, int]]:
        """The samples too long for the model's context.

        Returns:
            (sample id, estimated tokens of its longest request) of every sample, in input
            order, with a request (first attempt, any target language) above
            `config.context_limit`.
        """
        limit = self.config.context_limit
        longest: dict[int, int] = {}
        for job, units in self.units.items():
            for unit in units:
                tokens = sum(self.estimated_tokens(self.plan(unit, 0, None)))
                if tokens > limit:
                    r = self.jobs[job][0]
                    longest[r] = max(longest.get(r, 0), tokens)
        return [(self.records[r].sample_id, tokens) for r, tokens in sorted(longest.items())]

    def estimated_cost(self, planned: PlannedRequest) -> float:
        """The USD a request is expected to cost (0 for a model without a price).

        Args:
            planned: The request.
        """
        prompt, completion = self.estimated_tokens(planned)
        return self.prices.cost(self.config.model, prompt, completion, batch=self.config.batch)

    def reserve(self, planned: PlannedRequest) -> float:
        """Book a request's estimated cost before it is sent.

        Args:
            planned: The request.

        Returns:
            The estimate booked (the caller releases it when the reply is in).

        Raises:
            CostLimitReached: The spent, the booked and this estimate would pass
                `max_cost_usd`.
        """
        estimate = self.estimated_cost(planned)
        limit = self.config.max_cost_usd
        if limit is not None and self.spent_usd + self.in_flight_usd + estimate > limit:
            raise CostLimitReached
        self.in_flight_usd += estimate
        return estimate

    # -- jobs ---------------------------------------------------------------------------------------

    def finish_job(self, job: int, outcomes: list[tuple[str, object]]) -> None:
        """Record a job's outcome: its translation, or the first of its units' failure reasons.

        Args:
            job: The job's index.
            outcomes: Each unit's ("done", texts) or ("failed", reason), in unit order.
        """
        failed = [reason for state, reason in outcomes if state == "failed"]
        if failed:
            self.failures[job] = failed[0]
            return
        translated = {}
        for _, texts in outcomes:
            translated.update(texts)
        record = self.records[self.jobs[job][0]]
        self.results[job] = [translated[message_key(i, m.role)] for i, m in enumerate(record.messages)]

    async def attempt_unit(self, unit: Unit, attempt: Attempt, in_flight: dict) -> dict:
        """One attempt of a unit: its reply from the cache, or from one request; then the checks.

        Args:
            unit: The texts of one request.
            attempt: Which attempt (its number and the previous attempt's rejection, which the
                stricter instruction names); the pool's RETRY_STRICTER drives them, so the
                attempts go as `walk` follows them through the cache.
            in_flight: Request key -> future of the requests on their way: a unit whose request
                is the same as another's waits for that reply instead of paying again.

        Returns:
            The translated texts by key.

        Raises:
            Rejected: The checks refused the reply (the pool asks the next attempt).
            ChatRequestFailed: The request failed after the client's retries (this unit fails).
            RunRefused: A failure every request would meet (key, model, URL).
            CostLimitReached: The request would pass `max_cost_usd` (the pool halts).
        """
        planned = self.plan(unit, attempt.number, attempt.rejection)
        reply = self.cache.get(planned.key)
        while reply is None and planned.key in in_flight:
            await in_flight[planned.key]
            reply = self.cache.get(planned.key)
        if reply is None:
            reply = await self._request(planned, in_flight)
        elif planned.key not in self.fresh_keys:
            self.counted_cached.add(planned.key)
        rejection, parsed = self.judge(unit, reply)
        if rejection is None:
            return parsed
        if planned.key in self.fresh_keys and attempt.number < self.config.max_retries:
            self.retried_keys.add(planned.key)
        raise Rejected(rejection)

    async def _request(self, planned: PlannedRequest, in_flight: dict):
        """Send one request (its cost booked first), store the reply; see `attempt_unit`."""
        estimate = self.reserve(planned)
        future = asyncio.get_running_loop().create_future()
        in_flight[planned.key] = future
        try:
            reply = await self.client.complete(planned.messages, planned.settings)
            self.store(planned, reply)
            return reply
        except ChatRequestFailed as e:
            if e.reason in RUN_STOPPING_ERRORS:
                raise RunRefused(f"the server refused the requests ({e.reason}): check the "
                                 "key (OPENAI_API_KEY for OpenAI's API, else the variable "
                                 "named by --api-key-env), --model and --base-url") from None
            if e.reason in ("connection", "timeout") and self.client.stats.succeeded == 0:
                raise RunRefused(f"no reply from {self.client.base_url} ({e.reason}, "
                                 f"{e.attempts} attempts): check --base-url") from None
            raise
        finally:
            self.in_flight_usd -= estimate
            del in_flight[planned.key]
            future.set_result(None)

    async def run_streaming(self, progress) -> None:
        """Translate every job with requests as they are needed (one pool of `concurrency` units).

        A unit whose reply is rejected is asked again with a stricter instruction, up to
        `max_retries` times (FailurePolicy.RETRY_STRICTER); a failed request fails its job; the
        cost limit stops the pool (jobs not reached stay without outcome). A job ends when its
        last unit does.

        Args:
            progress: Called after each unit ends (`progress_bar`).

        Raises:
            RunRefused: See `attempt_unit`.
        """
        units = [(job, i) for job in range(len(self.jobs)) for i in range(len(self.units[job]))]
        outcomes: dict[int, dict[int, tuple[str, object]]] = {}
        in_flight: dict = {}

        def ended(job_unit, outcome) -> None:
            job, i = job_unit
            outcomes.setdefault(job, {})[i] = outcome
            if len(outcomes[job]) == len(self.units[job]):
                self.finish_job(job, [outcomes[job][k] for k in range(len(self.units[job]))])

        def failed(failure: JobFailure) -> None:
            reason = (f"{REQUEST_FAILED}:{failure.reason}"
                      if isinstance(failure.error, ChatRequestFailed) else failure.reason)
            ended(failure.job, ("failed", reason))

        async def work(job_unit, attempt: Attempt) -> dict:
            job, i = job_unit
            return await self.attempt_unit(self.units[job][i], attempt, in_flight)

        self.client = ChatClient(self.config.base_url, api_key_env=self.config.api_key_env,
                                 concurrency=self.config.concurrency,
                                 max_retries=self.config.max_retries, timeout_s=self.config.timeout_s)
        pool = JobPool(self.config.concurrency, FailurePolicy.RETRY_STRICTER,
                       failures=(ChatRequestFailed,), max_attempts=self.config.max_retries + 1,
                       progress=progress)
        try:
            await pool.run(units, work, on_result=lambda u, texts: ended(u, ("done", texts)),
                           on_failure=failed)
        finally:
            await self.client.aclose()

    def dry_run_plan(self) -> list[PlannedRequest]:
        """The requests a run would send next (one per unit without a final outcome in the cache;
        rejected replies may add retries on top)."""
        planned = []
        for job, units in self.units.items():
            for unit in units:
                state, value = self.walk(unit)
                if state == "request":
                    planned.append(value)
        return planned

    def resolve_from_cache(self) -> None:
        """Jobs whose outcome the cache alone decides (used before and after a batch round)."""
        for job, units in self.units.items():
            if job in self.results or job in self.failures:
                continue
            outcomes = [self.walk(u) for u in units]
            if all(state != "request" for state, _ in outcomes):
                self.finish_job(job, outcomes)

    # -- results ------------------------------------------------------------------------------------

    @property
    def retries(self) -> int:
        """Requests asked again: fresh replies rejected with attempts left, and the client's."""
        return len(self.retried_keys) + (self.client.stats.retries if self.client else 0)

    def failure_reasons(self, stopped_reason: str | None = None) -> dict[int, str]:
        """The reason of every job without a translation (as the failures file lists them).

        Args:
            stopped_reason: The reason of jobs never reached (`cost_limit`; default `not_run`).
        """
        return {job: self.failures.get(job, stopped_reason or "not_run")
                for job in range(len(self.jobs)) if job not in self.results}

    def problems(self, stopped_reason: str | None = None) -> list[str]:
        """One line per way this run fell short of its work (empty when it did not): pairs whose
        requests failed, and each language whose share of pairs rejected by the checks passed
        `max_rejected_fraction`. A stop at the cost limit is reported by the tool itself.

        Args:
            stopped_reason: As `failure_reasons`.

        Returns:
            The lines (the tool prints each and exits 1 when there is any).
        """
        reasons = self.failure_reasons(stopped_reason)
        failures_file = os.path.join(self.config.output_dir, FAILURES_FILE)
        lines = []
        not_done = Counter(r.split(":", 1)[-1] for r in reasons.values()
                           if r.startswith(REQUEST_FAILED) or r == "not_run")
        if not_done:
            count = sum(not_done.values())
            reason, times = not_done.most_common(1)[0]
            lines.append(f"{count} of {len(self.jobs)} (record, language) pairs failed on their "
                         f"requests (commonest: {reason}, {times}); they are listed in "
                         f"{failures_file} and not in the corpus; rerun the same command to ask "
                         "for them again (the replies received are cached)")
        limit = self.config.max_rejected_fraction
        for language in self.config.languages:
            jobs = [job for job, (_, lang) in enumerate(self.jobs) if lang == language]
            rejected = Counter(reasons[job] for job in jobs if job in reasons
                               and not reasons[job].startswith(REQUEST_FAILED)
                               and reasons[job] not in UNJUDGED)
            judged = sum(rejected.values()) + sum(job in self.results for job in jobs)
            count = sum(rejected.values())
            if judged and count / judged > limit:
                reason, times = rejected.most_common(1)[0]
                lines.append(f"{language}: {count} of {judged} pairs ({count / judged:.1%}) were "
                             f"rejected by the translation checks, above --max-rejected-fraction "
                             f"{limit:g} (commonest: {reason}, {times}); they are listed in "
                             f"{failures_file}; check the translator's replies, or raise the limit")
        return lines

    def summary(self, dry_run_requests: list[PlannedRequest] | None = None) -> dict:
        """The counts the tool prints as its last stdout line.

        Args:
            dry_run_requests: For a dry run, the requests it would send (priced, not sent).

        Returns:
            requested, cached, translated, failed (request_failed, rejected, by reason),
            retries, tokens and the estimated cost in USD.
        """
        if dry_run_requests is not None:
            cost = sum(self.estimated_cost(p) for p in dry_run_requests)
            return {"requested": len(dry_run_requests), "cached": len(self.counted_cached),
                    "translated": 0, "failed": 0, "retries": 0, "prompt_tokens": 0,
                    "completion_tokens": 0, "estimated_cost_usd": round(cost, 6), "dry_run": True}
        reasons = Counter(self.failures.values())
        return {"requested": self.requested, "cached": len(self.counted_cached),
                "translated": len(self.results), "failed": len(self.failures),
                "request_failed": sum(n for r, n in reasons.items() if r.startswith(REQUEST_FAILED)),
                "rejected": sum(n for r, n in reasons.items()
                                if not r.startswith(REQUEST_FAILED) and r not in UNJUDGED),
                "failure_reasons": dict(sorted(reasons.items())),
                "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "estimated_cost_usd": round(self.spent_usd, 6)}

    def write_outputs(self, stopped_reason: str | None = None) -> None:
        """Write the corpus (`<anchor>.jsonl` and one file per target language, in input
        order), the failures file, and remove `.jsonl` files of languages this run dropped.

        Args:
            stopped_reason: As `failure_reasons`.
        """
        out = Path(self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / f"{self.anchor}.jsonl") as f:
            for record in self.records:
                f.write(json.dumps(record_dict(record, self.anchor), ensure_ascii=False) + "\n")
        by_language = {lang: [] for lang in self.config.languages}
        failures = []
        for job, (r, lang) in enumerate(self.jobs):
            if job in self.results:
                by_language[lang].append(record_dict(self.records[r], lang, self.results[job]))
            else:
                reason = self.failures.get(job, stopped_reason or "not_run")
                failures.append({"id": self.records[r].sample_id, "language": lang, "reason": reason})
        for lang, rows in by_language.items():
            with atomic_open(out / f"{lang}.jsonl") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with atomic_open(out / FAILURES_FILE) as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in failures)
        # The folder is this tool's (translation_plan.json): any other *.jsonl is an earlier
        # run's language that this run dropped, and shard_corpus would read it as corpus.
        written = {f"{lang}.jsonl" for lang in (self.anchor, *self.config.languages)} | {FAILURES_FILE}
        for stale in sorted(out.glob("*.jsonl")):
            if stale.name not in written and stale.is_file():
                stale.unlink()
                print(f"removed {stale}: not a language of this run", file=sys.stderr)


def progress_bar(run: TranslationRun, enabled: bool) -> ProgressBar:
    """The translation's progress line on stderr: jobs ended, and done / cached / failed /
    retries / cost (and a batch's state when `--batch` polls one).

    Args:
        run: The run whose counts are shown.
        enabled: False draws nothing (`--no-progress`).

    Returns:
        The `jobs.ProgressBar`.
    """
    return ProgressBar(
        "translate", "job", len(run.jobs), enabled=enabled, mininterval=0.5,
        position=lambda _: len(run.results) + len(run.failures),
        postfix=lambda _: {"done": len(run.results), "cached": len(run.counted_cached),
                           "failed": len(run.failures), "retries": run.retries,
                           "cost": f"${run.spent_usd:.4f}"})
