"""Parallel corpus -> token shards: validate, tokenize with the chat template, write shards.

Every language's valid records, in input order, are cut into shards of `shard_size` samples; a
shard depends only on its own records, the tokenizer and the settings, so workers write shards
independently and the output is byte-identical whatever the worker count. A rerun over the same
inputs skips the shards whose completion marker exists and rewrites the others; a rerun with other
inputs or settings into the same directory is refused (plan.json says what the shards came from).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from sara_megatron.data.chat_tokenization import (
    check_seq_length,
    load_tokenizer,
    tokenize_record,
    tokenizer_fingerprint,
)
from sara_megatron.data.corpus_validation import RecordRef, ValidatedCorpus, validate_corpus
from sara_megatron.data.languages import known_languages
from sara_megatron.tool_errors import UserFacingError
from sara_megatron.data.token_shards import (
    ISSUES_NAME,
    MANIFEST_NAME,
    PLAN_NAME,
    SHARDS_FORMAT,
    SampleMeta,
    language_fingerprint,
    read_complete_marker,
    shard_prefix,
    write_token_shard,
)
from sara_megatron.io import (
    atomic_open,
    canonical_json,
    check_output_plan,
    sha256_text,
    write_json_atomic,
)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """What `tools/shard_corpus.py` is asked (see the field comments and the tool's --help)."""

    corpus_paths: tuple[str, ...]
    output_dir: str
    tokenizer: str  # HF tokenizer name or directory (the model's)
    anchor_language: str = "en"
    seq_length: int = 4096
    shard_size: int = 2048  # samples per shard
    workers: int = 1
    strict: bool = False
    # Differing copies of one (id, lang): "reject" them all, or keep the "first" / "last"
    # (corpus_validation); identical copies are dropped and counted either way.
    duplicates: str = "reject"
    extra_languages: tuple[str, ...] = ()
    chat_template_path: Optional[str] = None  # overrides the tokenizer's template
    trust_remote_code: bool = False
    allow_download: bool = False  # a hub id not in the local HF cache may be fetched


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write: its language, number and records."""

    language: str
    index: int
    records: tuple[RecordRef, ...]

    @property
    def prefix(self) -> str:
        """The shard's `token_shards.shard_prefix`."""
        return shard_prefix(self.language, self.index)


@dataclasses.dataclass(frozen=True)
class ShardProgress:
    """What the progress callback gets after each shard (see the field comments)."""

    shards_done: int
    shards_total: int
    tokens_written: int  # by this run (resumed shards not counted)
    samples_written: int
    elapsed_s: float  # since the first shard of this run started
    last_prefix: str
    resumed: int  # shards found complete from an earlier run


@dataclasses.dataclass
class ShardingReport:
    """What one sharding run did: the manifest written, the validated corpus and the counts."""

    manifest: dict
    corpus: ValidatedCorpus
    shards_written: int
    shards_resumed: int
    tokens_written: int
    elapsed_s: float  # the whole run
    writing_s: float  # tokenizing and writing shards (what tokens/s is measured over)


def plan_shards(corpus: ValidatedCorpus, shard_size: int) -> list[ShardTask]:
    """Cut each language's records into shards.

    Args:
        corpus: The validated corpus.
        shard_size: Samples a shard (>= 1).

    Returns:
        The tasks, language by language.

    Raises:
        ValueError: shard_size < 1.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    tasks = []
    for language in corpus.languages:
        refs = corpus.records[language]
        for index, start in enumerate(range(0, len(refs), shard_size)):
            tasks.append(ShardTask(language, index, tuple(refs[start:start + shard_size])))
    return tasks


def _plan(config: ShardingConfig, corpus: ValidatedCorpus, tokenizer, token_dtype) -> dict:
    """Everything the shard bytes depend on; its digest names the output's provenance."""
    return {
        "format": SHARDS_FORMAT,
        # Content, not paths: the corpus may move without invalidating finished shards.
        "corpus_files": [{"name": os.path.basename(f.path), "sha256": f.sha256, "bytes": f.size}
                         for f in corpus.files],
        "anchor_language": config.anchor_language,
        "known_languages": sorted(corpus.known_languages),
        "seq_length": config.seq_length,
        "shard_size": config.shard_size,
        # What the tokens depend on, not where the tokenizer was loaded from.
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                      "vocab_size": len(tokenizer)},
        "token_dtype": np.dtype(token_dtype).name,
        # Which copy of a differing duplicate is kept (not recorded for the default, so the
        # plans of corpora without such duplicates keep their digest).
        **({"duplicates": config.duplicates} if config.duplicates != "reject" else {}),
    }


# The worker-process tokenizer, loaded once per process by `_init_worker`.
_WORKER: dict = {}


def _init_worker(config: ShardingConfig, known: frozenset[str]) -> None:
    template = None
    if config.chat_template_path:
        with open(config.chat_template_path, encoding="utf-8") as f:
            template = f.read()
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer, config.trust_remote_code, template,
                                          config.allow_download)
    _WORKER["known"] = known
    _WORKER["config"] = config


def _write_shard(task: ShardTask, token_dtype: type, plan_digest: str) -> dict:
    tokenizer, known, config = _WORKER["tokenizer"], _WORKER["known"], _WORKER["config"]
    samples = []
    for ref in task.records:
        record = ref.read(known)
        tokenized = tokenize_record(tokenizer, record, config.seq_length)
        meta = SampleMeta(record.sample_id, record.language, tokenized.prompt_length,
                          len(tokenized.token_ids), tokenized.truncated, record.source)
        samples.append((meta, tokenized.token_ids))
    return write_token_shard(config.output_dir, task.prefix, samples, token_dtype, plan_digest)


class LanguageLostError(UserFacingError, ValueError):
    """A language of the corpus that has no record left once the bad ones are rejected."""


def check_every_language_kept(corpus: ValidatedCorpus) -> None:
    """Refuse a corpus in which the anchor language, or a language whose records were all
    rejected, has nothing left: sharding it would drop the language without a word (a target
    language whose anchors are missing: a corpus folder mixing two runs, or anchors from another
    input).

    Args:
        corpus: The validated corpus.

    Raises:
        LanguageLostError: naming each such language and its commonest rejection reasons.
    """
    import collections

    lost = sorted({i.language for i in corpus.issues if i.language} - set(corpus.records))
    if corpus.anchor_language not in corpus.records and corpus.anchor_language not in lost:
        lost.insert(0, corpus.anchor_language)
    if not lost:
        return
    parts, first = [], None
    for language in lost:
        issues = [i for i in corpus.issues if i.language == language]
        reasons = collections.Counter(i.reason for i in issues)
        why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3)) or "no records"
        parts.append(f"{language} ({why})")
        first = first or (issues[0] if issues else None)
    example = f"; the first: {first}" if first else ""
    raise LanguageLostError(
        f"no record of {'; '.join(parts)} is left after validation (anchor language "
        f"{corpus.anchor_language!r}){example}: fix the corpus, or leave that language's files "
        f"out of the input")


def shard_corpus(
    config: ShardingConfig, progress: Optional[Callable[[ShardProgress], None]] = None
) -> ShardingReport:
    """Validate the corpus, tokenize it and write the token shards and their manifest;
    a rerun into the same folder resumes (complete shards of the same plan are kept).

    Args:
        config: The sharding config.
        progress: Called after each shard with a `ShardProgress`.

    Returns:
        The `ShardingReport`.

    Raises:
        ValueError: A bad seq_length or shard size, an invalid corpus (strict), an output
            folder of another plan (`io.OutputFolderTaken`), or a language with no record
            left (`LanguageLostError`).
        FileNotFoundError: A missing tokenizer or corpus file.
    """
    start = time.perf_counter()
    check_seq_length(config.seq_length)  # before anything is validated, loaded or written
    known = known_languages(config.extra_languages)
    # The tokenizer first: a missing one is named before the whole corpus has been read.
    _init_worker(config, known)
    corpus = validate_corpus(config.corpus_paths, config.anchor_language, known, config.strict,
                             config.duplicates)
    check_every_language_kept(corpus)
    tokenizer = _WORKER["tokenizer"]
    from megatron.core.datasets.indexed_dataset import DType

    token_dtype = DType.optimal_dtype(len(tokenizer))
    plan = _plan(config, corpus, tokenizer, token_dtype)
    digest = sha256_text(canonical_json(plan))
    root = config.output_dir
    os.makedirs(root, exist_ok=True)
    check_output_plan(root, PLAN_NAME, plan, "shards")
    write_json_atomic(os.path.join(root, PLAN_NAME), plan)
    with atomic_open(os.path.join(root, ISSUES_NAME)) as f:
        for issue in corpus.issues:
            issue_json = json.dumps(dataclasses.asdict(issue), sort_keys=True, ensure_ascii=False)
            f.write(issue_json + "\n")

    tasks = plan_shards(corpus, config.shard_size)
    markers = {t.prefix: read_complete_marker(root, t.prefix, digest) for t in tasks}
    pending = [t for t in tasks if markers[t.prefix] is None]
    resumed = len(tasks) - len(pending)
    tokens = samples = 0
    writing_start = time.perf_counter()  # rates exclude validation and start-up

    def finished(task: ShardTask, marker: dict) -> None:
        nonlocal tokens, samples
        markers[task.prefix] = marker
        tokens += marker["tokens"]
        samples += marker["samples"]
        if progress:
            done = sum(m is not None for m in markers.values())
            progress(ShardProgress(done, len(tasks), tokens, samples,
                                   time.perf_counter() - writing_start, task.prefix, resumed))

    if config.workers <= 1 or len(pending) <= 1:
        for task in pending:
            finished(task, _write_shard(task, token_dtype, digest))
    else:
        # fork: workers inherit the imported modules (megatron, transformers) instead of
        # re-importing them; each still loads its own tokenizer in the initializer.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=config.workers, mp_context=context,
            initializer=_init_worker, initargs=(config, known),
        ) as pool:
            futures = {pool.submit(_write_shard, t, token_dtype, digest): t for t in pending}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())

    manifest = _manifest(config, corpus, tasks, markers, plan, digest)
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest)
    end = time.perf_counter()
    return ShardingReport(manifest, corpus, len(pending), resumed, tokens, end - start,
                          end - writing_start)


def _manifest(config: ShardingConfig, corpus: ValidatedCorpus, tasks: Sequence[ShardTask],
              markers: dict, plan: dict, digest: str) -> dict:
    languages = {}
    for language in corpus.languages:
        shards = [markers[t.prefix] for t in tasks if t.language == language]
        languages[language] = {
            "samples": sum(m["samples"] for m in shards),
            "tokens": sum(m["tokens"] for m in shards),
            "truncated": sum(m["truncated"] for m in shards),
            "no_response_tokens": sum(m["no_response_tokens"] for m in shards),
            "fingerprint": language_fingerprint(shards),
            "shards": [{k: m[k] for k in ("prefix", "samples", "tokens", "sha256")}
                       for m in shards],
        }
    corpus_fp = sha256_text(canonical_json({k: v["fingerprint"] for k, v in languages.items()}))
    return {
        "format": SHARDS_FORMAT,
        "plan_digest": digest,
        "anchor_language": plan["anchor_language"],
        "seq_length": plan["seq_length"],
        "token_dtype": plan["token_dtype"],
        "tokenizer": dict(plan["tokenizer"], source=os.fspath(config.tokenizer)),
        "corpus_fingerprint": "sha256:" + corpus_fp,
        "validation": corpus.summary(),
        "languages": languages,
    }
