"""Errors a user can fix, and the checks on outputs every tool makes before any compute.

A `UserFacingError` is printed by the tools as one line, `<tool>: error: <message>`, with exit
status 2 (see `launch.exit_at_once_on_error`), not as a traceback: a damaged shard or
checkpoint, a run that went non-finite, an output folder that cannot be written, a full disk.

`check_writable_output` is the one check of an output path, made before the model is built:
the folder that will hold it (or its nearest existing parent) must take a new file, and its file
system must have free space. A full disk met later is reported by `disk_full_error` in plain
words (errno 28, ENOSPC), whatever layer (numpy, torch's zip writer, megatron) hit it.

Ctrl-C is no error: a tool says it was interrupted, in one line, and exits 130
(`exit_on_interrupt`; the distributed tools through `launch.exit_at_once_on_error`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from typing import Iterator, Optional

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended


def interrupted_message(tool: str, resumable: bool = True) -> str:
    """The line a tool prints when Ctrl-C ends it.

    Args:
        tool: the tool's name as it prints it.
        resumable: the same command resumes the work (it says so).
    """
    return f"{tool}: interrupted" + ("; rerun the same command to resume" if resumable else "")


@contextlib.contextmanager
def exit_on_interrupt(tool: str, resumable: bool = True) -> Iterator[None]:
    """Around a one-process tool's work: Ctrl-C prints `interrupted_message` and exits 130,
    without a traceback.

    Args:
        tool: The tool's name as it prints it.
        resumable: Say that the same command resumes the work.

    Yields:
        Nothing; the body runs inside.
    """
    try:
        yield
    except KeyboardInterrupt:
        print(interrupted_message(tool, resumable), file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)


class UserFacingError(Exception):
    """Mixed into errors whose message says what to fix: printed as one line, exit 2."""


class InputError(UserFacingError, ValueError):
    """A value, file or setting the user gave that cannot be used as given (the message names it
    and says what would do)."""


class OutputNotWritableError(UserFacingError, OSError):
    """An output path that cannot be written (read-only, or a file where a folder is meant).

    An `OSError` built as `(errno, message)` or `(message)`; printed as one line, exit 2.
    """
    pass


class DiskFullError(UserFacingError, OSError):
    """No space left on the device an output goes to (errno 28, ENOSPC), in plain words.

    An `OSError` built as `(errno.ENOSPC, message)`; printed as one line, exit 2.
    """
    pass


def _existing_folder(path: str) -> str:
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def disk_full_message(path: str) -> str:
    """The plain-words message of a full disk holding `path`, saying what to do.

    Args:
        path: The file or folder whose device is full.
    """
    return (f"no space left on the device holding {path} (errno 28, ENOSPC): free some space "
            "there or write to another folder")


def check_writable_output(path: str | os.PathLike, what: str, is_file: bool = False) -> None:
    """Refuse an output that cannot be written, before any compute.

    The folder that will hold it (or its nearest existing parent) must take a new file (a real
    write, not a permission check), and its file system must have free space.

    Args:
        path: The output file or folder.
        what: How the output is named in the message (e.g. "--json" or "checkpoint.save_dir").
        is_file: `path` names a file (its folder is checked), else a folder (it or the nearest
            existing parent).

    Raises:
        OutputNotWritableError: A folder where a file is meant or the reverse, or the write fails.
        DiskFullError: The write fails with ENOSPC, or the file system has no free blocks.
    """
    path = os.fspath(path)
    target = os.path.dirname(os.path.abspath(path)) if is_file else path
    folder = _existing_folder(target)
    if is_file and os.path.isdir(path):
        raise OutputNotWritableError(f"{what} {path} is a folder, not a file")
    if not is_file and os.path.exists(path) and not os.path.isdir(path):
        raise OutputNotWritableError(f"{what} {path} is a file, not a folder")
    try:
        # A real write, not os.access: root passes access checks on a read-only mount.
        fd, probe = tempfile.mkstemp(prefix=".sara-write-probe-", dir=folder)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"{what}: {disk_full_message(folder)}") from None
        raise OutputNotWritableError(
            err.errno, f"{what} {path}: cannot write in {folder} ({err.strerror or err})"
        ) from None
    stats = os.statvfs(folder)
    if stats.f_bavail == 0:
        raise DiskFullError(errno.ENOSPC, f"{what}: {disk_full_message(folder)}")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException, path: Optional[str] = None) -> bool:
    """Whether `err` (or what caused it) is a full disk.

    Errno 28 anywhere in its chain, or, for errors that lose the errno (torch's zip writer says
    "file write failed"), a write error while the file system holding `path` has under 1 MiB left.

    Args:
        err: The error to classify.
        path: Where the failing write went, when known (enables the free-space test).
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
    if path is not None and any("write" in str(e).lower() for e in _chain(err)):
        try:
            stats = os.statvfs(_existing_folder(path))
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize < (1 << 20)
    return False


def disk_full_error(err: BaseException, path: Optional[str]) -> Optional[DiskFullError]:
    """A DiskFullError for `err` when it is a full disk (see `is_disk_full`), else None.

    Args:
        err: The error to classify (returned as it is when already a DiskFullError).
        path: Where the failing write went, when known; named in the message.
    """
    if isinstance(err, DiskFullError):
        return err
    if is_disk_full(err, path):
        where = path or next((e.filename for e in _chain(err)
                              if isinstance(e, OSError) and e.filename), "the output")
        return DiskFullError(errno.ENOSPC, disk_full_message(os.fspath(where)))
    return None


def user_error_message(err: BaseException, output: Optional[str] = None) -> Optional[str]:
    """The one-line message of an error the user can fix, else None.

    Args:
        err: The error being handled.
        output: The folder the tool writes to (a write error there with no space left is a full
            disk).
    """
    full = disk_full_error(err, output)
    if full is not None:
        return str(full.strerror or full)
    if isinstance(err, UserFacingError):
        return str(err.strerror) if isinstance(err, OSError) and err.strerror else str(err)
    return None


def report_user_error(tool: str, err: BaseException, output: Optional[str] = None) -> int:
    """In a one-process tool's `except` clause: an error the user can fix is printed as one line,
    `<tool>: error: <message>`, and its status (2) returned for the tool to exit with; any other
    error is raised again with its traceback (a bug: exit 1).

    Args:
        tool: the tool's name as it prints it (its argparse `prog`).
        err: the error being handled.
        output: the folder or file the tool writes (a write error there with no space left is a
            full disk, also when the error lost its errno).

    Returns:
        USER_ERROR_STATUS, after printing the line.

    Raises:
        BaseException: `err` itself, when the user cannot fix it.
    """
    message = user_error_message(err, output)
    if message is None:
        raise err
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS
