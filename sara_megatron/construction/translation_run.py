"""One translation run from its config: check the request and the output folder, then a dry run
(prices only), the streaming run or the Batch API rounds (`translation_batch`), and the written
corpus with what fell short of the work."""

from __future__ import annotations

import asyncio
import os
import sys

from sara_megatron.chat.cache import ReplyCache
from sara_megatron.construction.translation import (
    PLAN_FILE, CostLimitReached, SamplesTooLong, TranslationConfig, TranslationRun,
    progress_bar, read_anchor_records, translation_plan,
)
from sara_megatron.construction.translation_batch import run_batches
from sara_megatron.construction.translation_cost import PriceTable
from sara_megatron.data.languages import known_languages
from sara_megatron.io import check_output_plan, write_json_atomic
from sara_megatron.tool_errors import InputError


def _remove_new(paths: list[str]) -> None:
    """Remove what this run created (files, the SQLite side files, then an emptied folder)."""
    for path in paths:
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.isfile(name):
                os.remove(name)
    for path in paths:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def run_translation(config: TranslationConfig) -> dict:
    """Translate, write the corpus and the failures file.

    Args:
        config: The run's config.

    Returns:
        The summary (the tool prints it as its last stdout line), whose `problems` lists what
        fell short of the work (the tool's exit 1).

    Raises:
        ValueError: Bad input, or an output folder made from another input or settings, or by
            something else (the tool's exit 2); `SamplesTooLong` for samples whose requests
            cannot fit the model's context (`--dry-run` counts them instead, unpriced).
    """
    records = read_anchor_records(config.input_path, config.extra_languages)
    anchor = records[0].language
    known = known_languages(config.extra_languages)
    for lang in config.languages:
        if lang not in known:
            raise InputError(f"unknown language code {lang!r} (known: {', '.join(sorted(known))})")
        if lang == anchor:
            raise InputError(f"{lang!r} is the input's own (anchor) language")
    if config.max_cost_usd is not None and PriceTable(config.prices_path).per_million(config.model) is None:
        raise InputError(f"--max-cost-usd: no price for model {config.model!r}; give its prices "
                         "with --prices FILE")
    plan = translation_plan(config, anchor)
    check_output_plan(config.output_dir, PLAN_FILE, plan, "a corpus", owner="translate_corpus")
    run = TranslationRun(config, records, None)
    too_long = run.over_context()
    if config.dry_run:
        # Sends nothing and writes nothing: an absent cache is not created.
        cache = ReplyCache(config.cache_file, read_only=True) if os.path.exists(config.cache_file) else None
        run.cache = cache
        skipped = {sample_id for sample_id, _ in too_long}
        planned = [p for p in run.dry_run_plan()
                   if records[run.jobs[p.unit.job][0]].sample_id not in skipped]
        if cache is not None:
            cache.close()
        summary = run.summary(dry_run_requests=planned)
        summary["over_context_limit"] = len(too_long)
        over = (f"; {len(too_long)} sample(s) over the context limit {config.context_limit} "
                "tokens, not priced: a run refuses them" if too_long else "")
        print(f"dry run: {summary['requested']} request(s) to send ({summary['cached']} cached "
              f"replies used), estimated cost ${summary['estimated_cost_usd']:.4f} "
              f"(model {config.model}{', batch price' if config.batch else ''}){over}; "
              "nothing sent", file=sys.stderr)
        return summary
    if too_long:
        raise SamplesTooLong(too_long, config)
    made_here = [p for p in (config.output_dir, os.path.join(config.output_dir, PLAN_FILE),
                             config.cache_file) if not os.path.exists(p)]
    os.makedirs(config.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(config.output_dir, PLAN_FILE), plan)  # before the cache
    with ReplyCache(config.cache_file) as cache:
        run.cache = cache
        progress = progress_bar(run, config.progress)
        stopped = None
        try:
            if config.batch:
                asyncio.run(run_batches(run, progress))
            else:
                asyncio.run(run.run_streaming(progress))
        except CostLimitReached:
            stopped = "cost_limit"
        except ValueError:
            # Refused before any reply (a wrong model name, key or URL): leave nothing behind,
            # or the corrected command would find a folder made with the wrong settings.
            if run.requested == 0 and not cache.pending_batches():
                cache.close()
                _remove_new(made_here)
            raise
        finally:
            progress.close()
        if len(run.results) + len(run.failures) < len(run.jobs) and stopped is None:
            stopped = "cost_limit" if config.max_cost_usd is not None else "not_run"
        run.write_outputs(stopped)
    summary = run.summary()
    summary["problems"] = run.problems(stopped)
    if stopped == "cost_limit":
        summary["stopped"] = "max_cost_usd"
    return summary
