"""Validate a parallel corpus (JSON Lines, `corpus_format`) and index its usable records.

Problems are reported by file and line: invalid JSON or fields (text that is not encodable, such
as a lone surrogate escape, is an invalid field: caught here, not by the tokenizer mid-sharding),
an unknown language code, empty text, a duplicate (id, language), a target-language record with no
valid anchor of the same id.
By default a bad record is skipped and counted; `strict=True` raises on the first one. Every
non-blank line ends up either kept or counted under exactly one rejection reason.

Duplicates of one (id, lang): a copy identical to the first (the same parsed record) is dropped
and counted. Copies that differ are a conflict the corpus must settle: under the `duplicates`
policy "reject" every copy is rejected and reported (a target whose anchor was rejected so loses
its anchor); "first" keeps the first in file order, "last" the last. `validate_corpus` defaults to
"first", `tools/shard_corpus.py` to "reject" (a corpus about to be trained on must settle them).

Records are not kept in memory: the index holds each one's file, line and byte range, and the
shard workers re-read the lines they tokenize.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

from sara_megatron.data.corpus_format import (
    CORPUS_SIDE_FILES,
    DUPLICATE,
    INVALID_JSON,
    MISSING_ANCHOR,
    REJECTION_REASONS,
    ParallelRecord,
    RecordError,
    parse_record,
)
from sara_megatron.data.languages import known_languages as default_known_languages
from sara_megatron.tool_errors import UserFacingError


class CorpusError(UserFacingError, ValueError):
    """Raised in strict mode for the first bad record (message starts with `file:line:`).

    Args:
        issue: The record's `CorpusIssue`.
    """

    def __init__(self, issue: "CorpusIssue"):
        super().__init__(f"{issue} (strict: the first bad record stops the run)")
        self.issue = issue


@dataclasses.dataclass(frozen=True)
class CorpusIssue:
    """One rejected record: why (a `REJECTION_REASONS` entry), where, and what it was."""

    reason: str
    path: str
    line: int
    message: str
    sample_id: Optional[str] = None
    language: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.message}"


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """Where one valid record sits: enough to re-read it without scanning the file."""

    sample_id: str
    language: str
    path: str
    line: int
    offset: int  # byte offset of the line in the file
    length: int  # bytes of the line, newline included

    def read(self, known: frozenset[str]) -> ParallelRecord:
        """The record, read again from its file.

        Args:
            known: The accepted language codes.

        Returns:
            The `ParallelRecord`.
        """
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = f.read(self.length)
        return parse_record(raw.decode("utf-8"), known)


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """An input file as read: its path, sha256, bytes and lines."""

    path: str
    sha256: str
    size: int
    lines: int


@dataclasses.dataclass
class ValidatedCorpus:
    """The outcome of `validate_corpus`: the kept records by language (as references into the
    files), the rejected ones, and the files read."""

    anchor_language: str
    known_languages: frozenset[str]
    files: list[CorpusFile]
    records: dict[str, list[RecordRef]]  # language -> records in input order
    issues: list[CorpusIssue]
    blank_lines: int

    @property
    def languages(self) -> list[str]:
        """The anchor first, then the other languages in sorted order."""
        others = sorted(lang for lang in self.records if lang != self.anchor_language)
        return [self.anchor_language, *others] if self.anchor_language in self.records else others

    def summary(self) -> dict:
        """The counts: lines, blank lines, records read, kept by language, rejected by reason."""
        rejected = collections.Counter(issue.reason for issue in self.issues)
        kept = {lang: len(refs) for lang, refs in sorted(self.records.items())}
        return {
            "lines": sum(f.lines for f in self.files),
            "blank_lines": self.blank_lines,
            "records_read": sum(f.lines for f in self.files) - self.blank_lines,
            "kept": kept,
            "kept_total": sum(kept.values()),
            "rejected": {reason: rejected.get(reason, 0) for reason in REJECTION_REASONS},
            "rejected_total": len(self.issues),
        }

    def format_summary(self, examples_per_reason: int = 5) -> str:
        """The summary as lines for a person, with examples of each rejection.

        Args:
            examples_per_reason: Issues shown per reason.

        Returns:
            The text.
        """
        s = self.summary()
        lines = [
            f"corpus: {len(self.files)} file(s), {s['records_read']} records "
            f"({s['blank_lines']} blank lines ignored); kept {s['kept_total']}, "
            f"rejected {s['rejected_total']}",
            "  kept by language: " + ", ".join(f"{k}={v}" for k, v in s["kept"].items()),
        ]
        by_reason = collections.defaultdict(list)
        for issue in self.issues:
            by_reason[issue.reason].append(issue)
        for reason in REJECTION_REASONS:
            if by_reason[reason]:
                lines.append(f"  rejected {reason}: {len(by_reason[reason])}")
                lines += [f"    {issue}" for issue in by_reason[reason][:examples_per_reason]]
        return "\n".join(lines)


def expand_corpus_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The corpus files of the paths given.

    Args:
        paths: Files, or directories standing for their *.jsonl files in sorted order, less the
            side files that are not corpus records (`CORPUS_SIDE_FILES`).

    Returns:
        The files, in order.
    """
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "*.jsonl"))
                           if os.path.basename(f) not in CORPUS_SIDE_FILES)
            if not found:
                raise FileNotFoundError(f"corpus directory {p} has no *.jsonl files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus file {p} does not exist")
    if len(set(map(os.path.realpath, out))) != len(out):
        raise ValueError(f"a corpus file is listed twice: {out}")
    return out


DUPLICATE_POLICIES = ("reject", "first", "last")


def _record_digest(record: ParallelRecord) -> str:
    """What makes two copies of a record the same: its parsed fields (not key order, spacing or
    the fields the format ignores)."""
    text = json.dumps(dataclasses.asdict(record), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_corpus(
    paths: Sequence[str | os.PathLike],
    anchor_language: str,
    known_languages: Optional[frozenset[str]] = None,
    strict: bool = False,
    duplicates: str = "first",
) -> ValidatedCorpus:
    """Read and check every record of a parallel corpus (see the module docstring for the
    rules); a bad record is rejected and listed, or, `strict`, refused.

    Args:
        paths: Corpus files or folders (`expand_corpus_paths`).
        anchor_language: The anchor language's code.
        known_languages: The accepted codes (default: `languages.known_languages()`).
        strict: Raise on the first bad record instead of listing it.
        duplicates: Differing copies of one (id, lang): "reject" them all, or keep the
            "first" / "last"; identical copies are dropped and counted either way.

    Returns:
        The `ValidatedCorpus`.

    Raises:
        ValueError: An unknown anchor language or duplicates policy.
        CorpusError: With `strict`, the first bad record.
    """
    known = known_languages or default_known_languages()
    if anchor_language not in known:
        raise ValueError(f"anchor language {anchor_language!r} is not a known language code")
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got "
                         f"{duplicates!r}")
    issues: list[CorpusIssue] = []

    def reject(issue: CorpusIssue) -> None:
        if strict:
            raise CorpusError(issue)
        issues.append(issue)

    files, blank = [], 0
    valid: dict[tuple[str, str], RecordRef] = {}  # in input order of the kept copy
    first_seen: dict[tuple[str, str], tuple[RecordRef, str]] = {}  # first copy and its digest
    conflicts: dict[tuple[str, str], list[RecordRef]] = {}  # differing copies (policy reject)
    rejected_anchor: dict[str, CorpusIssue] = {}
    for path in expand_corpus_paths(paths):
        digest, offset, line_no = hashlib.sha256(), 0, 0
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                digest.update(raw)
                here = offset
                offset += len(raw)
                if not raw.strip():
                    blank += 1
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    reject(CorpusIssue(INVALID_JSON, path, line_no, f"not UTF-8 ({e.reason})"))
                    continue
                try:
                    record = parse_record(text, known)
                except RecordError as e:
                    issue = CorpusIssue(e.reason, path, line_no, str(e), e.sample_id, e.language)
                    if e.language == anchor_language and e.sample_id is not None:
                        rejected_anchor.setdefault(e.sample_id, issue)
                    reject(issue)
                    continue
                ref = RecordRef(record.sample_id, record.language, path, line_no, here, len(raw))
                key = (record.sample_id, record.language)
                record_digest = _record_digest(record)
                if key not in first_seen:
                    first_seen[key] = (ref, record_digest)
                    valid[key] = ref
                    continue
                first, first_digest = first_seen[key]
                if record_digest == first_digest or duplicates == "first":
                    # An identical copy (or the policy keeps the first): this one is dropped.
                    reject(CorpusIssue(
                        DUPLICATE, path, line_no,
                        f"duplicate (id, lang) = {key}; first at {first.path}:{first.line}",
                        *key,
                    ))
                elif duplicates == "last":
                    dropped = valid.pop(key)
                    reject(CorpusIssue(
                        DUPLICATE, dropped.path, dropped.line,
                        f"duplicate (id, lang) = {key} differs from a later copy; kept the last "
                        f"(--duplicates last), at {path}:{line_no}", *key,
                    ))
                    valid[key] = ref
                else:
                    if strict:
                        reject(_conflict_issue(key, ref, first))
                    conflicts.setdefault(key, []).append(ref)
        files.append(CorpusFile(path, digest.hexdigest(), offset, line_no))

    # Differing copies (policy reject): every copy goes, the first included.
    for key, later in conflicts.items():
        first = valid.pop(key)
        for ref in (first, *later):
            issue = _conflict_issue(key, ref, first if ref is not first else later[0])
            if key[1] == anchor_language:
                rejected_anchor.setdefault(key[0], issue)
            reject(issue)
    valid_refs = list(valid.values())

    order_of_path = {f.path: i for i, f in enumerate(files)}
    anchors = {ref.sample_id for ref in valid_refs if ref.language == anchor_language}
    records: dict[str, list[RecordRef]] = collections.defaultdict(list)
    for ref in sorted(valid_refs, key=lambda r: (order_of_path[r.path], r.line)):
        if ref.language != anchor_language and ref.sample_id not in anchors:
            why = rejected_anchor.get(ref.sample_id)
            detail = f" (its anchor record was rejected: {why})" if why else ""
            reject(CorpusIssue(
                MISSING_ANCHOR, ref.path, ref.line,
                f"no valid {anchor_language!r} anchor record with id {ref.sample_id!r}{detail}",
                ref.sample_id, ref.language,
            ))
            continue
        records[ref.language].append(ref)
    # Issues in file order, whichever pass found them.
    order = {f.path: i for i, f in enumerate(files)}
    issues.sort(key=lambda issue: (order[issue.path], issue.line))
    return ValidatedCorpus(anchor_language, known, files, dict(records), issues, blank)


def _conflict_issue(key: tuple[str, str], ref: RecordRef, other: RecordRef) -> CorpusIssue:
    return CorpusIssue(
        DUPLICATE, ref.path, ref.line,
        f"conflicting duplicate (id, lang) = {key}: differs from the copy at "
        f"{other.path}:{other.line}; every copy rejected (choose one with --duplicates "
        "first|last, or fix the corpus)", *key,
    )
