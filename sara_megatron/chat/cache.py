"""A SQLite reply cache (WAL): a request answered once is never paid for again.

Each reply is committed the moment it arrives, so after a crash or a kill -9 a rerun finds every
reply that had come back and requests only the rest. The key is a SHA-256 of everything that
decides the reply: model, prompt version, target language, the content sent (instructions and
source text) and the request settings; callers add what else matters (e.g. the attempt number of
a retry with a stricter instruction). The cache holds replies and batch ids, never a credential.

The same database records the Batch API batches a run submitted, so a killed `--batch` run
resumes by polling them instead of submitting (and paying for) the same requests again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
import urllib.parse

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    language TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    request_keys TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def request_key(*, model: str, prompt_version: str, language: str, content, settings: dict,
                **extra) -> str:
    """The cache key of one request.

    Args:
        model: The model name sent.
        prompt_version: The version of the prompt templates.
        language: The target language ("" where none).
        content: What was sent (any JSON value: the instructions and the source text).
        settings: `ChatSettings.as_dict()` of the request.
        **extra: Anything else that decides the reply (e.g. `attempt` of a stricter retry).

    Returns:
        The SHA-256 hex digest of the canonical JSON of every part (sorted keys).
    """
    parts = {"model": model, "prompt_version": prompt_version, "language": language,
             "content": content, "settings": settings, **extra}
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class CachedReply:
    """A stored reply: the fields of `ChatReply` that decide what is done with it."""

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ReplyCache:
    """The SQLite reply cache (see the module docstring).

    Args:
        path: The database file; its folder is created.
        read_only: Open an existing database without changing it (a dry run).
    """

    def __init__(self, path: str | os.PathLike, read_only: bool = False):
        self.path = os.fspath(path)
        if read_only:  # e.g. a dry run: look, change nothing
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30.0)
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL: a committed transaction survives the process being killed (it is in
        # the WAL file); only an OS crash or power loss may lose the last few.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        """Close the database (every reply is already committed)."""
        self._db.close()

    def __enter__(self) -> "ReplyCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def get(self, key: str) -> CachedReply | None:
        """The reply stored under a key.

        Args:
            key: A `request_key`.

        Returns:
            The `CachedReply`, or None when none is stored.
        """
        row = self._db.execute(
            "SELECT content, finish_reason, prompt_tokens, completion_tokens FROM replies WHERE key = ?",
            (key,)).fetchone()
        return None if row is None else CachedReply(*row)

    def put(self, key: str, reply, *, model: str, language: str, attempt: int) -> None:
        """Store and commit one reply.

        Args:
            key: Its `request_key`.
            reply: Any object with content, finish_reason, prompt_tokens and completion_tokens.
            model: The model that answered.
            language: The target language.
            attempt: The attempt number the request was made for (-1: unknown).
        """
        self._db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, language, attempt, reply.content, reply.finish_reason,
             int(reply.prompt_tokens), int(reply.completion_tokens), time.time()))
        self._db.commit()

    # -- Batch API bookkeeping ----------------------------------------------------------------------

    def record_batch(self, batch_id: str, input_file_id: str, keys: list[str]) -> None:
        """Record a submitted Batch API batch (committed at once, so a killed run polls it).

        Args:
            batch_id: The batch's id.
            input_file_id: The id of its uploaded request file.
            keys: The request keys (custom ids) it holds.
        """
        self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?)",
                         (batch_id, input_file_id, json.dumps(keys), "submitted", time.time()))
        self._db.commit()

    def pending_batches(self) -> list[tuple[str, list[str]]]:
        """The batches submitted and not collected yet.

        Returns:
            (batch id, request keys) of each, oldest first.
        """
        rows = self._db.execute(
            "SELECT batch_id, request_keys FROM batches WHERE status = 'submitted' ORDER BY created"
        ).fetchall()
        return [(batch_id, json.loads(keys)) for batch_id, keys in rows]

    def finish_batch(self, batch_id: str, status: str) -> None:
        """Mark a batch collected.

        Args:
            batch_id: The batch's id.
            status: Its final Batch API status (e.g. "completed", "expired").
        """
        self._db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))
        self._db.commit()
