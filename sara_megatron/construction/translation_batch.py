"""`--batch`: the same translation run through the OpenAI Batch API (half the price).

Rounds: each round takes the next missing attempt of every unfinished job (as the cache walk of
`TranslationRun` finds it), writes the request file (`<output>/batch_requests/`, at most 50,000
requests a batch), uploads it, creates the batch, records the batch id in the cache database at
once, polls until it ends, downloads the results and commits every reply to the same cache.
Replies rejected by the checks lead to the next round's stricter attempt; a line that came back
without a reply is submitted again in the next round, at most `max_retries` more times.

A killed run, rerun with the same command, first polls the batches it recorded and had not
collected — it does not submit (and pay for) them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from sara_megatron.chat.cache import CachedReply
from sara_megatron.chat.client import ChatClient, ChatRequestFailed
from sara_megatron.construction.translation import (
    CostLimitReached, PlannedRequest, RunRefused, TranslationRun,
)
from sara_megatron.io import atomic_open

log = logging.getLogger(__name__)
MAX_BATCH_REQUESTS = 50_000
FINAL_STATES = ("completed", "failed", "expired", "cancelled")


def _reply_from_body(body: dict) -> CachedReply | None:
    choices = body.get("choices") or []
    if not choices:
        return None
    message = choices[0].get("message") or {}
    if not isinstance(message.get("content"), str):
        return None
    usage = body.get("usage") or {}
    return CachedReply(message["content"], choices[0].get("finish_reason") or "stop",
                       int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _next_requests(run: TranslationRun) -> dict[str, PlannedRequest]:
    planned = {}
    for job, units in run.units.items():
        if job in run.results or job in run.failures:
            continue
        for unit in units:
            state, value = run.walk(unit)
            if state == "request":
                planned.setdefault(value.key, value)
    return planned


def _note_error(run: TranslationRun, key: str, reason: str) -> None:
    run.request_errors[key] = reason
    run.request_error_counts[key] = run.request_error_counts.get(key, 0) + 1


async def _collect(run: TranslationRun, batch_id: str, keys: list[str], progress) -> None:
    """Poll a batch to its end and commit its replies to the cache."""
    client = run.client
    while True:
        batch = await client.retrieve_batch(batch_id)
        counts = getattr(batch, "request_counts", None)
        done = f"{getattr(counts, 'completed', 0)}/{getattr(counts, 'total', 0)}" if counts else ""
        progress(None, f"{batch_id} {batch.status} {done}".strip())
        if batch.status in FINAL_STATES:
            break
        await asyncio.sleep(run.config.batch_poll_s)
    planned = _next_requests(run)
    answered = set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        for line in (await client.file_text(file_id)).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key = item.get("custom_id")
            if key not in keys:
                continue
            answered.add(key)
            response = item.get("response") or {}
            reply = None
            if response.get("status_code") == 200:
                reply = _reply_from_body(response.get("body") or {})
            if reply is None:
                code = (item.get("error") or {}).get("code") or f"http_{response.get('status_code')}"
                _note_error(run, key, f"batch_{code}")
                continue
            if key in planned:
                run.store(planned[key], reply)
            else:  # a batch submitted with other settings than this run's: keep the reply anyway
                run.cache.put(key, reply, model=run.config.model, language="", attempt=-1)
    for key in set(keys) - answered:
        _note_error(run, key, f"batch_{batch.status}")
    run.cache.finish_batch(batch_id, batch.status)


async def _submit(run: TranslationRun, requests: list[PlannedRequest], name: str) -> str:
    folder = Path(run.config.output_dir) / "batch_requests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with atomic_open(path) as f:
        for p in requests:
            f.write(json.dumps({"custom_id": p.key, "method": "POST", "url": "/v1/chat/completions",
                                "body": p.body()}, ensure_ascii=False) + "\n")
    file_id = await run.client.upload_batch_file(path.read_bytes(), path.name)
    batch_id = await run.client.create_batch(file_id, metadata={"tool": "translate_corpus"})
    run.cache.record_batch(batch_id, file_id, [p.key for p in requests])
    log.info("submitted batch %s (%d requests)", batch_id, len(requests))
    return batch_id


async def run_batches(run: TranslationRun, progress) -> None:
    """Run the translation through Batch API rounds (see the module docstring).

    Args:
        run: The run, its cache open.
        progress: The progress line (`translation.progress_bar`), shown each poll.

    Raises:
        CostLimitReached: The next round would pass `max_cost_usd`.
        RunRefused: A Batch API request the client's retries did not fix.
    """
    config = run.config
    run.client = ChatClient(config.base_url, api_key_env=config.api_key_env,
                            concurrency=min(config.concurrency, 4),
                            max_retries=config.max_retries, timeout_s=config.timeout_s)
    try:
        await _rounds(run, progress)
    except ChatRequestFailed as e:  # an upload, create, poll or download that retries did not fix
        raise RunRefused(f"a Batch API request failed ({e.reason}); rerun the same command to go "
                         "on (submitted batches are recorded and polled, not submitted again)") from None
    finally:
        await run.client.aclose()


async def _rounds(run: TranslationRun, progress) -> None:
    config = run.config
    for batch_id, keys in run.cache.pending_batches():  # a killed run's batches first
        await _collect(run, batch_id, keys, progress)
    round_index = 0
    while True:
        run.resolve_from_cache()
        progress(None)
        requests = list(_next_requests(run).values())
        if not requests:
            return
        if config.max_cost_usd is not None:
            kept = []
            for planned in requests:
                try:
                    run.reserve(planned)
                except CostLimitReached:
                    break
                kept.append(planned)
            if not kept:
                raise CostLimitReached
            requests = kept
        for start in range(0, len(requests), MAX_BATCH_REQUESTS):
            chunk = requests[start:start + MAX_BATCH_REQUESTS]
            name = f"round{round_index:03d}-part{start // MAX_BATCH_REQUESTS:03d}"
            batch_id = await _submit(run, chunk, name)
            await _collect(run, batch_id, [p.key for p in chunk], progress)
        run.in_flight_usd = 0.0
        round_index += 1
