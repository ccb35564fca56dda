"""Token shards on disk: Megatron-Core indexed datasets per language, with per-sample metadata.

    <dir>/manifest.json                 written last: shards, counts, fingerprints (see README)
    <dir>/plan.json                     inputs and settings the shards were made from
    <dir>/<lang>/<lang>-00000.bin/.idx  `megatron.core.datasets.indexed_dataset` (one sequence
                                        and one document per sample)
    <dir>/<lang>/<lang>-00000.samples.jsonl   one line per row: id, lang, prompt_length,
                                        token_count, truncated, source
    <dir>/<lang>/<lang>-00000.done.json completion marker: counts and sha256 of the three files

A shard's files are written under temporary names and renamed into place; its marker is written
last, so a shard is complete exactly when its marker exists (and names the current plan).
A reader checks each shard where it is first used (`shard_verification`): its structure and
token ids always, the manifest's sha256 unless opened with `verify=False`; a stamp in the
user's cache folder (`file_stamps`) remembers the result for unchanged files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from sara_megatron.data.shard_verification import check_shard, shard_content_hashes
from sara_megatron.io import (
    canonical_json,
    commit_file,
    sha256_file,
    sha256_text,
    temporary_path,
    write_json_atomic,
)

SHARDS_FORMAT = "sara-token-shards/1"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
ISSUES_NAME = "corpus_issues.jsonl"


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    """The metadata of one stored sample (a line of a shard's `.samples.jsonl`; see the field
    comments)."""

    sample_id: str
    language: str
    prompt_length: int  # tokens before the response: the loss mask starts here
    token_count: int  # tokens stored (after truncation)
    truncated: bool
    source: str

    def to_json(self) -> dict:
        """The `.samples.jsonl` line: {"id", "lang", "prompt_length", "token_count",
        "truncated", "source"}."""
        return {"id": self.sample_id, "lang": self.language, "prompt_length": self.prompt_length,
                "token_count": self.token_count, "truncated": self.truncated,
                "source": self.source}

    @classmethod
    def from_json(cls, obj: dict) -> "SampleMeta":
        """The metadata of a `.samples.jsonl` line.

        Args:
            obj: The parsed line (`to_json`'s shape).

        Returns:
            The `SampleMeta`.
        """
        return cls(obj["id"], obj["lang"], int(obj["prompt_length"]), int(obj["token_count"]),
                   bool(obj["truncated"]), obj["source"])


def shard_prefix(language: str, index: int) -> str:
    """The path of a shard relative to the output directory, without extension.

    Args:
        language: The shard's language.
        index: Its number within the language.

    Returns:
        `<language>/<language>-<index:05d>`.
    """
    return f"{language}/{language}-{index:05d}"


def _paths(root: str, prefix: str) -> dict[str, str]:
    base = os.path.join(root, prefix)
    return {"bin": base + ".bin", "idx": base + ".idx", "samples": base + ".samples.jsonl"}


def marker_path(root: str, prefix: str) -> str:
    """The completion marker of a shard: `<root>/<prefix>.done.json`.

    Args:
        root: The output directory.
        prefix: The shard's `shard_prefix`.
    """
    return os.path.join(root, prefix) + ".done.json"


def write_token_shard(
    root: str,
    prefix: str,
    samples: Sequence[tuple[SampleMeta, np.ndarray]],
    token_dtype: type,
    plan_digest: str,
) -> dict:
    """Write one shard (atomically) and its completion marker.

    Args:
        root: The output directory.
        prefix: The shard's `shard_prefix`.
        samples: (metadata, token ids [token_count]) of each sample, in order.
        token_dtype: The numpy dtype of the stored ids.
        plan_digest: The digest of the sharding plan (a marker of another plan is rewritten).

    Returns:
        The marker: the plan digest, the prefix, counts (samples, tokens, truncated, no
        response tokens), and each file's sha256 and bytes.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final = _paths(root, prefix)
    tmp = {k: temporary_path(v) for k, v in final.items()}
    os.makedirs(os.path.dirname(final["bin"]), exist_ok=True)
    limit = np.iinfo(token_dtype).max
    builder = IndexedDatasetBuilder(tmp["bin"], dtype=token_dtype)
    for meta, ids in samples:
        if len(ids) and int(ids.max()) > limit:
            raise ValueError(f"token id {int(ids.max())} of sample {meta.sample_id!r} does not fit "
                             f"{np.dtype(token_dtype).name}")
        builder.add_item(torch.from_numpy(np.ascontiguousarray(ids)))
        builder.end_document()
    builder.finalize(tmp["idx"])
    with open(tmp["samples"], "w", encoding="utf-8", newline="\n") as f:
        for meta, _ in samples:
            f.write(json.dumps(meta.to_json(), sort_keys=True, ensure_ascii=False) + "\n")
    for key in ("bin", "idx", "samples"):
        commit_file(tmp[key], final[key])
    marker = {
        "plan_digest": plan_digest,
        "prefix": prefix,
        "samples": len(samples),
        "tokens": int(sum(m.token_count for m, _ in samples)),
        "truncated": int(sum(m.truncated for m, _ in samples)),
        "no_response_tokens": int(sum(m.prompt_length >= m.token_count for m, _ in samples)),
        "sha256": {k: sha256_file(final[k]) for k in ("bin", "idx", "samples")},
        "bytes": {k: os.path.getsize(final[k]) for k in ("bin", "idx", "samples")},
    }
    write_json_atomic(marker_path(root, prefix), marker)
    return marker


def read_complete_marker(root: str, prefix: str, plan_digest: str) -> Optional[dict]:
    """The shard's marker if the shard is complete for this plan, else None (rewrite it).

    Args:
        root: The output directory.
        prefix: The shard's `shard_prefix`.
        plan_digest: This run's plan digest.
    """
    try:
        with open(marker_path(root, prefix), encoding="utf-8") as f:
            marker = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("plan_digest") != plan_digest:
        return None
    for key, path in _paths(root, prefix).items():
        if not os.path.exists(path) or os.path.getsize(path) != marker["bytes"][key]:
            return None
    return marker


def language_fingerprint(markers: Sequence[dict]) -> str:
    """The fingerprint of a language's shard contents: tokens, index and per-sample metadata.

    Args:
        markers: The language's shard markers (each with its content "sha256"), in order.

    Returns:
        `sha256:` + the sha256 of their hashes' canonical JSON.
    """
    return "sha256:" + sha256_text(canonical_json([m["sha256"] for m in markers]))


@dataclasses.dataclass(frozen=True)
class ShardedSample:
    """Where a sample is stored: its metadata, the shard's index in its language, its row."""

    meta: SampleMeta
    shard: int  # index into the language's shard list
    row: int


class TokenShards:
    """Reader of a finished shard directory (the manifest must exist).

    Each language's shards are checked when first used (`samples`): structure and token ids
    always; with `verify` (the default) also every file's sha256 against the manifest, remembered
    for unchanged files by a stamp (`file_stamps`). A damaged shard raises ShardDamagedError.

    Args:
        root: The shard directory (`tools/shard_corpus.py`'s output).
        verify: Check the files' sha256 against the manifest.

    Raises:
        FileNotFoundError: No manifest (not a shard directory, or sharding unfinished).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = os.fspath(root)
        path = os.path.join(self.root, MANIFEST_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{self.root} has no {MANIFEST_NAME}: not a token shard directory, or "
                "tools/shard_corpus.py did not finish there (rerun it to resume)"
            )
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, "
                             f"expected {SHARDS_FORMAT!r}")
        self._datasets: dict[tuple[str, int], object] = {}
        self._samples: dict[str, list[ShardedSample]] = {}
        self.verify_hashes = verify
        self._checked: dict[str, list] = {}  # language -> per shard: verified hashes or None

    @property
    def anchor_language(self) -> str:
        """The corpus's anchor language."""
        return self.manifest["anchor_language"]

    @property
    def seq_length(self) -> int:
        """The length samples were cut to."""
        return self.manifest["seq_length"]

    @property
    def languages(self) -> list[str]:
        """Every language, the anchor included."""
        return list(self.manifest["languages"])

    @property
    def target_languages(self) -> list[str]:
        """The languages but the anchor."""
        return [lang for lang in self.languages if lang != self.anchor_language]

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (every stored id is below it)."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    def language_fingerprint(self, language: str) -> str:
        """The fingerprint of a language's shards, derived from the sha256 of their files as
        they are on disk (verified against the manifest unless verification is off), never
        copied from the manifest: a store of priors records what it was computed from.

        Args:
            language: A language of the corpus.
        """
        self.check_language(language)
        hashes = [h if h is not None else shard_content_hashes(self.root, shard)
                  for h, shard in zip(self._checked[language],
                                      self._language(language)["shards"])]
        return language_fingerprint([{"sha256": h} for h in hashes])

    def _language(self, language: str) -> dict:
        if language not in self.manifest["languages"]:
            raise KeyError(f"language {language!r} is not in {self.root} "
                           f"(languages: {', '.join(self.languages)})")
        return self.manifest["languages"][language]

    def check_language(self, language: str) -> None:
        """Check the language's shards once (see the class doc).

        Args:
            language: A language of the corpus.

        Raises:
            ShardDamagedError: A damaged shard.
            KeyError: A language not in the corpus.
        """
        if language in self._checked and (not self.verify_hashes
                                          or None not in self._checked[language]):
            return
        self._checked[language] = [
            check_shard(self.root, shard, self.vocab_size, check_hash=self.verify_hashes)
            for shard in self._language(language)["shards"]
        ]

    def verify(self) -> None:
        """Check every shard of every language, sha256 included."""
        verify_hashes, self.verify_hashes = self.verify_hashes, True
        try:
            for language in self.languages:
                self.check_language(language)
        finally:
            self.verify_hashes = verify_hashes

    def samples(self, language: str) -> list[ShardedSample]:
        """The samples of a language.

        Args:
            language: A language of the corpus.

        Returns:
            Every sample in shard order, with its metadata (its shards checked first).
        """
        if language not in self._samples:
            self.check_language(language)
            out = []
            for shard_index, shard in enumerate(self._language(language)["shards"]):
                path = _paths(self.root, shard["prefix"])["samples"]
                with open(path, encoding="utf-8") as f:
                    rows = [SampleMeta.from_json(json.loads(line)) for line in f]
                if len(rows) != shard["samples"]:
                    raise ValueError(f"{path} has {len(rows)} rows, the manifest says "
                                     f"{shard['samples']}")
                out += [ShardedSample(meta, shard_index, row) for row, meta in enumerate(rows)]
            self._samples[language] = out
        return self._samples[language]

    def tokens(self, sample: ShardedSample) -> np.ndarray:
        """A sample's token ids (a read-only view into the memory-mapped .bin).

        Args:
            sample: From `samples`.
        """
        key = (sample.meta.language, sample.shard)
        dataset = self._datasets.get(key)
        if dataset is None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            prefix = self._language(sample.meta.language)["shards"][sample.shard]["prefix"]
            dataset = IndexedDataset(os.path.join(self.root, prefix))
            self._datasets[key] = dataset
        return dataset[sample.row]

    def __getstate__(self):
        # Data-loader workers reopen the memory maps themselves.
        state = dict(self.__dict__)
        state["_datasets"] = {}
        return state
