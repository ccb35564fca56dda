"""One async job pool for the request-driven tools: answering, translation and evaluation.

`JobPool` runs a job's coroutine for each job with at most `concurrency` jobs in flight, skips
the jobs its `JsonlRecord` already holds (appending each finished one, crash-safe, as it ends),
reports progress after every job, and applies one `FailurePolicy` to a job whose work raised one
of its failure types: go on (`CONTINUE`), call the job again with a stricter attempt
(`RETRY_STRICTER`, when the work raises `Rejected`), or start no new job (`STOP`). A job may
raise `Halt` to stop the pool without an outcome of its own (a cost limit); any other exception
is a bug: the pool cancels the jobs in flight and re-raises it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
import sys
from typing import IO, Any, Awaitable, Callable, Hashable, Iterable, Mapping

from sara_megatron.io import drop_torn_last_line, read_jsonl_objects


class FailurePolicy(enum.Enum):
    """What a pool does with a job whose work failed (raised one of the pool's failure types,
    or `Rejected`).

    CONTINUE: record the failure, go on with the other jobs.
    RETRY_STRICTER: a `Rejected` job is called again with the next attempt, which carries the
        rejection (the caller makes its request stricter), up to `max_attempts`; then, or on a
        failure type, as CONTINUE.
    STOP: record the failure and start no new job; the jobs in flight end (and are recorded).
    """

    CONTINUE = "continue"
    RETRY_STRICTER = "retry_stricter"
    STOP = "stop"


class Rejected(Exception):
    """Raised by a job's work when its outcome was refused by the caller's checks.

    Args:
        reason: What was wrong (e.g. `lost_boxed`), passed to the next attempt and, when no
            attempt is left, recorded as the job's failure reason.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Halt(Exception):
    """Raised by a job's work to stop the pool: no new job starts, the jobs in flight end, and
    this job has no outcome (neither result nor failure)."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """Which try of a job this is.

    Attributes:
        number: 0 for the first try, then 1, 2, ... (RETRY_STRICTER only).
        rejection: The reason the previous try was rejected, None on the first.
    """

    number: int = 0
    rejection: str | None = None


@dataclasses.dataclass(frozen=True)
class JobFailure:
    """A job that ended without a result.

    Attributes:
        job: The job as it was given to `JobPool.run`.
        reason: The `reason` attribute of the error when it has one (`ChatRequestFailed`,
            `Rejected`), else the error's class name.
        error: The exception the job's work raised last.
        attempts: How many times the work was called for this job.
    """

    job: Any
    reason: str
    error: BaseException
    attempts: int


@dataclasses.dataclass
class PoolCounts:
    """Live counts of one `JobPool.run`, handed to the progress callback after every job.

    Attributes:
        total: Jobs given, the recorded ones included.
        skipped: Jobs the record already held (not run).
        done: Jobs that ended with a result in this run.
        failed: Jobs that ended with a failure in this run.
        retried: Further attempts made under RETRY_STRICTER.
    """

    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0

    @property
    def finished(self) -> int:
        """Jobs with an outcome: skipped, done or failed."""
        return self.skipped + self.done + self.failed


@dataclasses.dataclass
class PoolReport:
    """What one `JobPool.run` did.

    Attributes:
        counts: The final `PoolCounts`.
        failures: Every failed job, in the order they ended.
        halted: True when the pool stopped early: a job raised `Halt`, or STOP met a failure.
    """

    counts: PoolCounts
    failures: list[JobFailure]
    halted: bool


class JsonlRecord:
    """An append-only JSONL file of finished jobs: what a pool resumes from.

    Each `append` writes one whole line, flushed (and fsynced, with `fsync`) before it returns,
    so a kill -9 loses only the jobs still in flight (with `fsync`, an OS crash too). `load` reads the file back; a last line without its
    newline (what a kill mid-write leaves) is cut off first.

    Args:
        path: The JSONL file (need not exist).
        key: The job key of a stored row (the pool's `key` of the same job).
        check: Called as `check(path, line_no, row)` for every row read; raises to refuse a
            file this run cannot continue (another settings' rows, a row missing fields).
        error: The exception type for a line that is not a JSON object.
        fields: When given, only these fields of an appended row are written, in this order.
        fsync: Sync each line to the disk (an fsync blocks the event loop for its duration:
            leave it off where many short jobs a second are recorded).
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[Mapping], Hashable], *,
                 check: Callable[[str, int, dict], None] | None = None,
                 error: type[Exception] = ValueError, fields: tuple[str, ...] | None = None,
                 fsync: bool = True):
        self.path = os.fspath(path)
        self.key = key
        self.check = check
        self.error = error
        self.fields = fields
        self.fsync = fsync
        self.done: dict[Hashable, dict] = {}
        self._file: IO | None = None

    def load(self) -> dict[Hashable, dict]:
        """Read the rows already in the file (the first row of a key wins).

        Returns:
            `self.done`: key -> row, also what `JobPool.run` skips.

        Raises:
            `error`: a line that is not UTF-8 or not a JSON object; whatever `check` raises.
        """
        if os.path.exists(self.path):
            drop_torn_last_line(self.path)
            for line_no, row in read_jsonl_objects(self.path, self.error):
                if self.check is not None:
                    self.check(self.path, line_no, row)
                self.done.setdefault(self.key(row), row)
        return self.done

    def open(self) -> None:
        """Open the file for appending (created when absent; a torn last line cut off first).
        `JobPool.run` calls it; a second call does nothing."""
        if self._file is None:
            if os.path.exists(self.path):
                drop_torn_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8", newline="\n")

    def append(self, row: Mapping) -> None:
        """Write one row as one line, flushed (and fsynced) before returning.

        Args:
            row: A JSON-able mapping (its `fields`, when the record has them).
        """
        self.open()
        if self.fields is not None:
            row = {k: row[k] for k in self.fields}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.done.setdefault(self.key(row), dict(row))

    def close(self) -> None:
        """Close the file (every row is already written)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlRecord":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """A tqdm line on stderr, redrawn at most every `mininterval` seconds.

    Args:
        desc: The label at the line's start (the tool's or the benchmark's name).
        unit: What one step counts ("sample", "job", "item").
        total: Steps in all.
        enabled: False draws nothing.
        initial: Steps already done at the start.
        mininterval: Seconds between redraws at most.
        position: The bar's position from the pool's counts (default: `counts.finished`).
        postfix: The `name=value` fields shown after the bar, from the pool's counts.
    """

    def __init__(self, desc: str, unit: str, total: int, *, enabled: bool = True,
                 initial: int = 0, mininterval: float = 0.1,
                 position: Callable[[PoolCounts | None], int] | None = None,
                 postfix: Callable[[PoolCounts | None], dict] | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                        file=sys.stderr, mininterval=mininterval, dynamic_ncols=True)
        self.position = position or (lambda counts: counts.finished)
        self.postfix = postfix

    def __call__(self, counts: PoolCounts | None, status: str | None = None) -> None:
        """Show `counts` (and `status`, e.g. a batch's state, which redraws at once)."""
        if self.postfix is not None or status:
            fields = dict(self.postfix(counts)) if self.postfix is not None else {}
            if status:
                fields["batch"] = status
            self.bar.set_postfix(fields, refresh=False)
        position = self.position(counts)
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)  # redraws at most every mininterval
        elif status:
            self.bar.refresh()

    def close(self) -> None:
        """End the line."""
        self.bar.close()


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) else type(error).__name__


class JobPool:
    """Runs jobs concurrently under one failure policy (see the module docstring).

    Args:
        concurrency: Jobs in flight at most (>= 1). The chat client bounds requests on its own;
            this bounds the jobs handed to it (and so, for one request a job, the requests).
        policy: The `FailurePolicy`.
        failures: Exception types that are a job's failure (e.g. `ChatRequestFailed`); any other
            exception but `Rejected` and `Halt` is a bug and propagates.
        max_attempts: Tries of a job under RETRY_STRICTER (>= 1).
        record: Where finished jobs are appended and resumed from; None keeps nothing (the
            caller resumes by other means, e.g. the reply cache).
        key: The record key of a job; required with `record`.
        progress: Called with the live `PoolCounts` after every job ends.

    Raises:
        ValueError: `concurrency` or `max_attempts` below 1, or a record without `key`.
    """

    def __init__(self, concurrency: int, policy: FailurePolicy, *,
                 failures: tuple[type[BaseException], ...] = (), max_attempts: int = 1,
                 record: JsonlRecord | None = None, key: Callable[[Any], Hashable] | None = None,
                 progress: Callable[[PoolCounts], None] | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if record is not None and key is None:
            raise ValueError("a pool with a record needs the key of a job")
        self.concurrency = concurrency
        self.policy = policy
        self.failure_types = tuple(failures)
        self.max_attempts = max_attempts if policy is FailurePolicy.RETRY_STRICTER else 1
        self.record = record
        self.key = key
        self.progress = progress

    async def run(self, jobs: Iterable[Any], work: Callable[[Any, Attempt], Awaitable[Any]], *,
                  on_result: Callable[[Any, Any], None] | None = None,
                  on_failure: Callable[[JobFailure], None] | None = None) -> PoolReport:
        """Run `work(job, attempt)` for every job the record does not hold.

        Args:
            jobs: The jobs, in the order they are started.
            work: The coroutine of one try of a job. Its result is appended to the record (a
                JSON-able mapping then) before `on_result` sees it.
            on_result: Called as `on_result(job, result)` when a job ends with a result.
            on_failure: Called with the `JobFailure` when a job ends with a failure.

        Returns:
            The `PoolReport`.

        Raises:
            Whatever `work` raised that is neither a failure type, `Rejected` nor `Halt`, after
            the jobs in flight were cancelled.
        """
        jobs = list(jobs)
        done = {}
        if self.record is not None:
            self.record.open()
            done = self.record.done
        pending = [job for job in jobs if self.key is None or self.key(job) not in done]
        counts = PoolCounts(total=len(jobs), skipped=len(jobs) - len(pending))
        failures: list[JobFailure] = []
        queue = iter(pending)
        halted = False

        def fail(job, error: BaseException, attempts: int) -> None:
            nonlocal halted
            failure = JobFailure(job, _reason(error), error, attempts)
            failures.append(failure)
            counts.failed += 1
            if on_failure is not None:
                on_failure(failure)
            if self.policy is FailurePolicy.STOP:
                halted = True

        async def run_one(job) -> bool:
            """One job to its outcome; False when it halted the pool."""
            nonlocal halted
            attempt = Attempt()
            while True:
                try:
                    result = await work(job, attempt)
                except Halt:
                    halted = True
                    return False
                except Rejected as e:
                    if attempt.number + 1 < self.max_attempts:
                        attempt = Attempt(attempt.number + 1, e.reason)
                        counts.retried += 1
                        continue
                    fail(job, e, attempt.number + 1)
                except self.failure_types as e:
                    fail(job, e, attempt.number + 1)
                else:
                    if self.record is not None:
                        self.record.append(result)
                    counts.done += 1
                    if on_result is not None:
                        on_result(job, result)
                return True

        async def worker():
            while not halted:
                job = next(queue, None)
                if job is None:
                    return
                if await run_one(job) and self.progress is not None:
                    self.progress(counts)

        if self.progress is not None and counts.skipped:
            self.progress(counts)
        tasks = [asyncio.ensure_future(worker())
                 for _ in range(min(self.concurrency, max(1, len(pending))))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # A bug in one job (or the caller's cancellation): the others must not go on
            # sending requests and writing records behind the raised error.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return PoolReport(counts, failures, halted)
