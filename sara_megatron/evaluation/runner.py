"""Our evaluation runner: the paper's protocol over any backend, resumable, nothing scored by accident.

For each benchmark, language, run and item it asks the backend once, scores the reply, and appends
the record to `items.jsonl` (flushed per item). A rerun into the same folder reads those records and
asks only what is missing. A request that fails after the client's retries is not scored: the
runner stops sending, lets the requests in flight finish, writes what is complete and raises
`EvaluationIncomplete` (the tool exits non-zero; run it again to resume).

Each run has its own seed (`seed + run - 1`), and each item its own seed derived from the run's,
the benchmark, the language and the item id: the same request gets the same seed on a rerun, and
an in-process sample does not depend on the items beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, Mapping, Sequence

from sara_megatron.evaluation.backends import GenerationBackend, HFBackend
from sara_megatron.evaluation.benchmarks import (
    BENCHMARK_LANGUAGES, BenchmarkItem, load_benchmark_source,
)
from sara_megatron.evaluation.model_identity import fingerprint_changes
from sara_megatron.evaluation.records import (
    ITEMS_FILE, RESULTS_FILE, TABLE_FILE, ItemRecordWriter, accuracy_summary, ordered_languages,
    read_results, render_table, write_results,
)
from sara_megatron.evaluation.tasks import MULTIPLE_CHOICE_BENCHMARKS, item_messages, score_output
from sara_megatron.io import atomic_open
from sara_megatron.jobs import FailurePolicy, JobPool, ProgressBar
from sara_megatron.prompts import OPTION_LETTERS
from sara_megatron.tool_errors import InputError, UserFacingError

PROTOCOLS = ("generate", "loglikelihood")
# Settings that change what a model answers: a resume under other values would mix two evaluations.
ANSWER_SETTINGS = ("model", "protocol", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                   "template_language", "templates_sha256", "prompt_version",
                   "chat_template_kwargs", "shifcon_shift")


class EvaluationIncomplete(RuntimeError):
    """Some requests failed after their retries; nothing of theirs was scored.

    Args:
        failures: ((benchmark, language, run, item_id), error) of each, at least one.
    """

    def __init__(self, failures: Sequence[tuple[tuple, BaseException]]):
        first_key, first_error = failures[0]
        super().__init__(
            f"{len(failures)} request(s) failed after retries and were not scored (first: "
            f"{'/'.join(map(str, first_key))}: {first_error}); the answered items are saved — "
            "run the same command again to resume")
        self.failures = list(failures)


class SettingsMismatch(UserFacingError, ValueError):
    """The output folder holds an evaluation of another model, on other benchmark data, or with
    other answer-changing settings."""


class PromptsTooLong(UserFacingError, ValueError):
    """Items whose prompt cannot fit the model's context (named); refused before any request.

    Args:
        too_long: (item, why) of each, the first 10 named.
        rule: The backend's rule, in words.
    """

    def __init__(self, too_long: Sequence[tuple[BenchmarkItem, str]], rule: str):
        shown = "; ".join(f"{i.benchmark}/{i.language} item {i.item_id} ({why})"
                          for i, why in too_long[:MAX_NAMED_ITEMS])
        more = (f"; and {len(too_long) - MAX_NAMED_ITEMS} more"
                if len(too_long) > MAX_NAMED_ITEMS else "")
        super().__init__(f"{len(too_long)} item(s) too long for the model's context, refused "
                         f"before any request or forward: {shown}{more}; the rule: {rule}")
        self.items = [item for item, _ in too_long]


MAX_NAMED_ITEMS = 10
REFUSAL_ADVICE = "use a new --output, or --restart (which discards the folder's answers)"


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """What to evaluate.

    Attributes:
        benchmarks: Benchmark names.
        languages: Language codes (a benchmark without one skips it).
        runs: Runs per language (each its own seed).
        seed: The first run's seed (`run_seed`).
        limit: The first `limit` items of each benchmark and language.
        data_dir: Local benchmark files (None: the hub).
        template_language: "en", or "native": each language's own translated template.
        templates: Translated templates (`prompts.load_templates`).
        protocol: "generate" (a reply, its box scored) or "loglikelihood" (the likeliest
            option letter).

    Raises:
        ValueError: An unknown protocol, runs < 1, or native templates missing a language.
    """

    benchmarks: tuple[str, ...]
    languages: tuple[str, ...]
    runs: int = 3
    seed: int = 0
    limit: int | None = None
    data_dir: str | None = None
    template_language: str = "en"  # "en", or "native": each language's own translated template
    templates: Mapping | None = None
    protocol: str = "generate"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.template_language not in ("en", "native"):
            raise ValueError("template_language must be 'en' or 'native'")
        if self.template_language == "native":
            missing = [lang for lang in self.languages
                       if lang != "en" and lang not in (self.templates or {})]
            if missing:
                raise InputError("--template-language native: the templates file has no "
                                 f"templates for {', '.join(missing)}")

    def item_template_language(self, language: str) -> str:
        """The template language of a language's items: itself when native, else "en".

        Args:
            language: The items' language.
        """
        return language if self.template_language == "native" else "en"


def run_seed(base_seed: int, run: int) -> int:
    """The seed of a run: `base_seed + run - 1`.

    Args:
        base_seed: The plan's seed.
        run: The run's number, from 1.
    """
    return base_seed + run - 1


def item_seed(base_seed: int, run: int, item: BenchmarkItem) -> int:
    """A 31-bit seed for one (run, item): stable across reruns, processes and machines.

    Args:
        base_seed: The plan's seed.
        run: The run's number, from 1.
        item: The item (its benchmark, language and id enter the hash).
    """
    text = f"{run_seed(base_seed, run)}/{item.benchmark}/{item.language}/{item.item_id}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") >> 1


def _say(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def check_resumable(output_dir: str, settings: Mapping) -> None:
    """Refuse an output folder evaluated with another model (`model_fingerprint`, when `settings`
    has one), on other content of a benchmark file both read (`benchmark_sources`), or under
    other answer-changing settings.

    Args:
        output_dir: The output folder.
        settings: This run's settings.

    Raises:
        SettingsMismatch: Naming what differs (or items without a results file).
    """
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(output_dir, ITEMS_FILE)):
            raise SettingsMismatch(f"{output_dir} has {ITEMS_FILE} but no {RESULTS_FILE}: cannot "
                                   f"tell which settings produced it; {REFUSAL_ADVICE}")
        return
    previous = read_results(path).get("settings", {})
    if "model_fingerprint" in settings:
        changes = fingerprint_changes(previous.get("model_fingerprint"),
                                      settings["model_fingerprint"])
        if changes:
            raise SettingsMismatch(f"{output_dir} holds answers of another model "
                                   f"({'; '.join(changes)}); {REFUSAL_ADVICE}")
    before_sources = previous.get("benchmark_sources") or {}
    changed_sources = [
        f"{key} ({now['source']}): {before_sources[key]['fingerprint'][:19]}… -> "
        f"{now['fingerprint'][:19]}…"
        for key, now in (settings.get("benchmark_sources") or {}).items()
        if key in before_sources and before_sources[key].get("fingerprint") != now["fingerprint"]]
    if changed_sources:
        raise SettingsMismatch(f"{output_dir} was scored on other benchmark data "
                               f"({'; '.join(changed_sources)}); {REFUSAL_ADVICE}")
    changed = [k for k in ANSWER_SETTINGS if previous.get(k) != settings.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise SettingsMismatch(f"{output_dir} was evaluated with other settings ({detail}); "
                               f"use the same settings to resume, or {REFUSAL_ADVICE}")


def discard_previous(output_dir: str) -> None:
    """--restart: the folder's answers, results and table go; nothing else in it is touched.

    Args:
        output_dir: The output folder.
    """
    for name in (ITEMS_FILE, RESULTS_FILE, TABLE_FILE):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


class EvaluationRunner:
    """One evaluation: the plan's items over a backend, into an output folder (see the module
    docstring).

    Args:
        backend: Where replies come from; may come later (`use_backend`), after `prepare` has
            refused what it must without loading a model.
        plan: The `EvaluationPlan`.
        output_dir: The output folder.
        settings: What results.json records and a resume compares (`ANSWER_SETTINGS`, the
            model's fingerprint).
        progress: Draw a progress line per benchmark.
        restart: Ignore and replace the folder's earlier answers.
        say: Where one-line notes go (default: stderr, prefixed `evaluate:`).
    """

    def __init__(self, backend: GenerationBackend | None, plan: EvaluationPlan, output_dir: str,
                 settings: Mapping, *, progress: bool = True, restart: bool = False,
                 say: Callable[[str], None] = _say):
        """`backend` may come later (`use_backend`), after `prepare` has refused what it must
        without loading a model. `restart`: ignore and replace the folder's earlier answers."""
        self.plan, self.output_dir = plan, os.fspath(output_dir)
        self.settings = dict(settings)
        self.progress, self.say, self.restart = progress, say, restart
        self.backend = None
        self.items = None
        if backend is not None:
            self.use_backend(backend)

    def use_backend(self, backend: GenerationBackend) -> None:
        """Set the backend.

        Args:
            backend: The backend.

        Raises:
            NotImplementedError: The log-likelihood protocol over a server.
        """
        if self.plan.protocol == "loglikelihood" and not isinstance(backend, HFBackend):
            raise NotImplementedError(
                "--protocol loglikelihood over a server (a completions endpoint with echo and "
                "logprobs) is not built; use --backend hf")
        self.backend = backend

    # -- planning -----------------------------------------------------------------------------------

    def benchmark_languages(self, name: str) -> list[str]:
        """The plan's languages a benchmark has (the others named in a note).

        Args:
            name: The benchmark.
        """
        available = BENCHMARK_LANGUAGES[name]
        skipped = [lang for lang in self.plan.languages if lang not in available]
        if skipped:
            self.say(f"{name}: no {', '.join(skipped)} in this benchmark; skipped")
        return [lang for lang in self.plan.languages if lang in available]

    def load_items(self) -> tuple[dict[str, dict[str, list[BenchmarkItem]]], dict]:
        """The items per benchmark and language, and the source and fingerprint of each file
        read, keyed "benchmark/language"."""
        items, sources = {}, {}
        for name in self.plan.benchmarks:
            if self.plan.protocol == "loglikelihood" and name not in MULTIPLE_CHOICE_BENCHMARKS:
                self.say(f"{name}: not multiple choice, no log-likelihood protocol; skipped")
                continue
            items[name] = {}
            for lang in self.benchmark_languages(name):
                loaded = load_benchmark_source(name, lang, self.plan.data_dir, self.plan.limit)
                items[name][lang] = loaded.items
                sources[f"{name}/{lang}"] = {"source": loaded.source,
                                             "fingerprint": loaded.fingerprint}
        return items, sources

    def prepare(self) -> None:
        """Read the benchmarks and refuse a folder that holds another evaluation: before a model
        is loaded or anything is written. Fingerprints of files an earlier run read and this one
        does not are kept, so a later run that reads them again is still compared."""
        if self.items is not None:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        self.items, sources = self.load_items()
        results_path = os.path.join(self.output_dir, RESULTS_FILE)
        earlier = {}
        if not self.restart and os.path.exists(results_path):
            earlier = read_results(results_path).get("settings", {}).get("benchmark_sources") or {}
        self.settings["benchmark_sources"] = {**earlier, **sources}
        if not self.restart:
            check_resumable(self.output_dir, {**self.settings, "benchmark_sources": sources})

    def check_prompt_lengths(self, items, done: Mapping) -> None:
        """Every item still to ask must fit the model's context (the backend's rule), checked
        before the first request or forward: an over-long item is never sent.

        Args:
            items: benchmark -> language -> items.
            done: The answered items, by `record_key` (skipped).

        Raises:
            PromptsTooLong: Naming the items.
        """
        too_long = getattr(self.backend, "prompt_too_long", None)
        if too_long is None:
            return
        # Log-likelihood scores an option letter (a token, for the tokenizers we know) instead of
        # a generated reply.
        reply_tokens = 1 if self.plan.protocol == "loglikelihood" else None
        refused = []
        for name, per_language in items.items():
            for lang, lang_items in per_language.items():
                for item in lang_items:
                    if all((name, lang, run, item.item_id) in done
                           for run in range(1, self.plan.runs + 1)):
                        continue
                    why = too_long(item_messages(item, self.plan.item_template_language(lang),
                                                 self.plan.templates), reply_tokens)
                    if why is not None:
                        refused.append((item, why))
        if refused:
            raise PromptsTooLong(refused, self.backend.context_rule(reply_tokens))

    # -- answering ----------------------------------------------------------------------------------

    async def answer(self, item: BenchmarkItem, run: int) -> tuple[str, str | None, bool]:
        """Ask the backend about one item in one run and score the reply.

        Args:
            item: The item.
            run: The run's number (its seed, `item_seed`).

        Returns:
            (the output: the reply, or the options' log-likelihoods as JSON; the extracted
            answer or None; whether it is correct).

        Raises:
            ChatRequestFailed: A server request that failed after its retries.
        """
        messages = item_messages(item, self.plan.item_template_language(item.language),
                                 self.plan.templates)
        if self.plan.protocol == "loglikelihood":
            letters = OPTION_LETTERS[:len(item.options)]
            scores = await asyncio.to_thread(self.backend.continuation_logprobs, messages,
                                             list(letters), item.language)
            best = letters[max(range(len(scores)), key=scores.__getitem__)]
            output = json.dumps(dict(zip(letters, scores)))
            return output, best, best == item.gold
        output = await self.backend.generate(messages, item_seed(self.plan.seed, run, item),
                                             language=item.language)
        extracted, correct = score_output(item, output)
        return output, extracted, correct

    # -- results ------------------------------------------------------------------------------------

    def summarize(self, items, done: Mapping) -> tuple[dict, bool]:
        """Per benchmark and language: run accuracies (percent), mean, std (ddof 1), n; only
        languages whose every run is fully answered.

        Args:
            items: benchmark -> language -> items.
            done: The answered item records, by `record_key`.

        Returns:
            (benchmark -> language -> `accuracy_summary`, whether everything is complete).
        """
        benchmarks, complete = {}, True
        for name, per_language in items.items():
            for lang, lang_items in per_language.items():
                accuracies = []
                for run in range(1, self.plan.runs + 1):
                    records = [done.get((name, lang, run, i.item_id)) for i in lang_items]
                    if any(r is None for r in records):
                        break
                    accuracies.append(100.0 * sum(r["correct"] for r in records) / len(records))
                if len(accuracies) == self.plan.runs:
                    benchmarks.setdefault(name, {})[lang] = accuracy_summary(accuracies,
                                                                             len(lang_items))
                else:
                    complete = False
        return benchmarks, complete

    def write_outputs(self, items, done) -> tuple[dict, bool]:
        """Write results.json and table.md from the answered items.

        Args:
            items: benchmark -> language -> items.
            done: The answered item records, by `record_key`.

        Returns:
            As `summarize`.
        """
        benchmarks, complete = self.summarize(items, done)
        write_results(self.output_dir, self.settings, benchmarks, complete=complete)
        languages = ordered_languages(lang for per in items.values() for lang in per)
        with atomic_open(os.path.join(self.output_dir, TABLE_FILE)) as f:
            f.write(render_table(benchmarks, languages, self.settings.get("model", "model"),
                                 runs=self.plan.runs))
        return benchmarks, complete

    async def run(self) -> dict:
        """Prepare, ask every item not yet answered, write the results (the backend is closed
        at the end).

        Returns:
            {"settings", "benchmarks", "complete"}.

        Raises:
            ValueError: No backend; as `prepare` and `check_prompt_lengths`.
            EvaluationIncomplete: Requests failed after their retries (what was answered is
                written; a rerun resumes).
        """
        if self.backend is None:
            raise ValueError("EvaluationRunner.run needs a backend (use_backend)")
        self.prepare()
        items = self.items
        items_path = os.path.join(self.output_dir, ITEMS_FILE)
        with ItemRecordWriter(items_path) as record:
            if not self.restart:
                record.load()
            done = record.done
            try:
                self.check_prompt_lengths(items, done)
            except PromptsTooLong:
                await self.backend.aclose()
                raise
            if self.restart:
                discard_previous(self.output_dir)
            elif done:
                self.say(f"resuming: {len(done)} answered items in {items_path}")
            self.write_outputs(items, done)  # the settings are on disk before the first request
            failures = []
            try:
                failures = await self._answer_all(items, record)
            finally:
                await self.backend.aclose()
        benchmarks, complete = self.write_outputs(items, done)
        if failures:
            raise EvaluationIncomplete(failures)
        return {"settings": self.settings, "benchmarks": benchmarks, "complete": complete}

    async def _answer_all(self, items, record: ItemRecordWriter) -> list:
        """Ask every (item, run) not in `record`, benchmark by benchmark; the first request that
        fails after the client's retries stops the run (STOP: the requests in flight end and
        are kept). Returns [(key, error)] of the failed requests."""
        from sara_megatron.chat.client import ChatRequestFailed

        def key(job) -> tuple:
            item, run = job
            return (item.benchmark, item.language, run, item.item_id)

        async def answer(job, attempt) -> dict:
            item, run = job
            output, extracted, correct = await self.answer(item, run)
            return dict(benchmark=item.benchmark, language=item.language, run=run,
                        item_id=item.item_id, output=output, extracted=extracted,
                        gold=item.gold, correct=bool(correct))

        for name, per_language in items.items():
            jobs = [(item, run) for lang_items in per_language.values()
                    for run in range(1, self.plan.runs + 1) for item in lang_items]
            bar = ProgressBar(name, "item", len(jobs), enabled=self.progress,
                              initial=sum(key(job) in record.done for job in jobs))
            pool = JobPool(self.backend.concurrency, FailurePolicy.STOP,
                           failures=(ChatRequestFailed,), record=record, key=key, progress=bar)
            try:
                report = await pool.run(jobs, answer)
            finally:
                bar.close()
            if report.failures:
                return [(key(f.job), f.error) for f in report.failures]
        return []
