"""Crash-safe file writes: write beside the target, fsync, rename over it.

A reader (or a rerun after a kill) sees either the old file or the complete new one, never a torn
write. `os.replace` is atomic within one file system, which is why the temporary file lives in the
target's own directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Iterator

from sara_megatron.tool_errors import InputError, UserFacingError

TMP_SUFFIX = ".partial"


def temporary_path(path: str | os.PathLike) -> str:
    """The name a file is written under before it is renamed into place.

    Args:
        path: The final path.

    Returns:
        `path` + `.partial`.
    """
    return os.fspath(path) + TMP_SUFFIX


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to the disk.

    Args:
        path: The file.
    """
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to the disk.

    Args:
        path: The directory.
    """
    # The rename itself lives in the directory entry; without this a power loss may undo it.
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp_path: str | os.PathLike, final_path: str | os.PathLike) -> None:
    """fsync a written file and atomically rename it into place (then fsync its directory).

    Args:
        tmp_path: The complete file, in the same file system as `final_path`.
        final_path: Where it goes (replaced when it exists).
    """
    fsync_file(tmp_path)
    os.replace(tmp_path, final_path)
    fsync_directory(os.path.dirname(os.path.abspath(final_path)))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open `path.partial` for writing; on a clean exit rename it to `path`.

    Args:
        path: The final path.
        mode: An open mode with "w" ("w" text in UTF-8 with `\n` newlines, or "wb").

    Yields:
        The open file. On an exception the partial file is removed and `path` is untouched.

    Raises:
        ValueError: A mode without "w".
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    tmp = temporary_path(path)
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    commit_file(tmp, path)


def canonical_json(obj) -> str:
    """Deterministic JSON text: what digests and byte-identical outputs are computed from.

    Args:
        obj: A JSON-able value.

    Returns:
        Its JSON (sorted keys, indent 1, non-ASCII kept) and a final newline.
    """
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `canonical_json(obj)` to a file crash-safely (`atomic_open`).

    Args:
        path: The file.
        obj: A JSON-able value.
    """
    with atomic_open(path, "w") as f:
        f.write(canonical_json(obj))


class OutputFolderTaken(UserFacingError, ValueError):
    """An output folder that holds what another run (other inputs or settings) or another
    program made: the tool refuses it instead of mixing its output into it."""


def check_output_plan(root: str | os.PathLike, plan_name: str, plan: dict, what: str, *,
                      owner: str | None = None) -> None:
    """Refuse an output folder that holds what other inputs or settings made.

    The folder's `plan_name` file, the record of the inputs and settings an earlier run wrote
    there, must equal `plan` (then this run continues that one). A folder without the record is
    taken as new; with `owner` it must then be empty too, so a tool that writes several files
    never mixes them with anybody else's. The caller writes `plan` (`write_json_atomic`) before
    its first output.

    Args:
        root: The output folder (need not exist).
        plan_name: The record's file name inside it.
        plan: This run's inputs and settings (JSON-able).
        what: What the folder holds, for the message ("a corpus").
        owner: The tool's name, or None to accept a folder with other files in it.

    Raises:
        OutputFolderTaken: The record differs (the message names the differing keys), or a
            non-empty folder without it when `owner` is given.
    """
    root = os.fspath(root)
    path = os.path.join(root, plan_name)
    if not os.path.exists(path):
        if owner is not None and os.path.isdir(root) and os.listdir(root):
            raise OutputFolderTaken(
                f"{root} is not empty and was not made by {owner} (it has no {plan_name}): "
                "write to a new or empty output folder")
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    if sha256_text(canonical_json(old)) != sha256_text(canonical_json(plan)):
        differs = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise OutputFolderTaken(
            f"{root} holds {what} made from other inputs or settings (differs in: "
            f"{', '.join(differs)}); write to a new output directory or delete this one")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """A file's SHA-256.

    Args:
        path: The file.
        chunk_size: Bytes read at a time.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """The SHA-256 hex digest of a text's UTF-8 bytes.

    Args:
        text: Any text.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def drop_torn_last_line(path: str | os.PathLike) -> int:
    """Cut off a last line without its newline, which is what a kill mid-append leaves.
    Appended JSONL files (answers, evaluation items) resume from what is complete.

    Args:
        path: The file (it must exist).

    Returns:
        The bytes kept.
    """
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return keep


def decode_utf8_line(data: bytes, path: str, line_no: int, error: type[Exception]) -> str:
    """One line of a text input as text.

    Args:
        data: The line's bytes.
        path: The file, for the message.
        line_no: The line's number (1-based), for the message.
        error: The exception type raised.

    Returns:
        The decoded line.

    Raises:
        error: A byte that is not UTF-8 (a file saved as latin-1 or cp1252, say), naming the
            file, line and column instead of the decoder's bare byte position.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(data[:e.start].decode("utf-8", errors="replace")) + 1
        raise error(f"{path}:{line_no}: not UTF-8 (byte 0x{data[e.start]:02x} at column "
                    f"{column}); save the file as UTF-8") from None


def read_json_file(path: str | os.PathLike, error: type[Exception] = InputError):
    """The JSON value of a file.

    Args:
        path: The file.
        error: The exception type raised for a bad file.

    Raises:
        error: A byte that is not UTF-8, or text that is not JSON, naming the file and line.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    text = "".join(decode_utf8_line(line, path, line_no, error)
                   for line_no, line in enumerate(data.splitlines(keepends=True), start=1))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_jsonl_objects(path: str | os.PathLike, error: type[Exception] = InputError,
                       limit: int | None = None, complete_lines_only: bool = False
                       ) -> Iterator[tuple[int, dict]]:
    """The objects of a JSONL file, one a non-blank line.

    Args:
        path: The file.
        error: The exception type raised for a bad line.
        limit: Yield the first `limit` objects at most (None: all).
        complete_lines_only: Skip a last line without its newline: a reader of a file another
            process is still appending to (or one a kill cut short) must neither fail on nor
            cut that line.

    Yields:
        (line number, object), 1-based.

    Raises:
        error: A line that is not UTF-8 or not a JSON object, naming the file and line, so
            that a user can open the file there.
    """
    path = os.fspath(path)
    yielded = 0
    # Bytes, decoded line by line: a decoding error then knows its line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if limit is not None and yielded >= limit:
                return
            if complete_lines_only and not raw.endswith(b"\n"):
                return
            line = decode_utf8_line(raw, path, line_no, error)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{line_no}: a row must be a JSON object")
            yielded += 1
            yield line_no, obj
