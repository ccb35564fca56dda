"""Remembered hashes: a small JSON stamp per verified thing (a token shard, a checkpoint folder),
so that later opens of the same, unchanged files need not read them again.

    {"format": "sara-file-stamp/1", "target": "/abs/path/of/shard-or-checkpoint",
     "files": {"en-00000.bin": {"size": 81920, "mtime_ns": ..., "ctime_ns": ..., "inode": ...,
                                "sha256": "...", ...}}}

An entry is trusted only while the file's size, modification time, change time and inode are all
as recorded; any write to the file changes its change time (which, unlike the modification time,
no program can set back), and a replaced file has another inode, so a changed file is hashed
again. A stamp that cannot be read is ignored; one that cannot be written is not an error (the
files are then hashed on every open).

Stamps live in a cache folder, not in the data folders: `$SARA_VERIFY_CACHE`, else
`$XDG_CACHE_HOME/sara-megatron/verified`, else `~/.cache/sara-megatron/verified`, one file per
target named by the sha256 of its real path. Outputs stay as their tools wrote them (shard
folders byte-identical whatever the worker count), and read-only corpora are remembered too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Optional

from sara_megatron.io import sha256_file

log = logging.getLogger(__name__)

STAMP_FORMAT = "sara-file-stamp/1"


def file_identity(path: str) -> dict:
    """What a stamp entry must match for the file to count as unchanged.

    Args:
        path: The file.

    Returns:
        Its size, mtime_ns, ctime_ns and inode.
    """
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def stamp_folder() -> str:
    """The folder of the stamps (see the module docstring for the variables it reads)."""
    folder = os.environ.get("SARA_VERIFY_CACHE")
    if not folder:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(cache, "sara-megatron", "verified")
    return folder


def stamp_path(target: str) -> str:
    """Where the stamp of a target lives.

    Args:
        target: A shard's path prefix or a checkpoint folder.

    Returns:
        A file in `stamp_folder()` named by the sha256 of the target's real path.
    """
    real = os.path.realpath(target)
    return os.path.join(stamp_folder(), hashlib.sha256(real.encode("utf-8")).hexdigest()[:40]
                        + ".json")


class FileStamp:
    """The stamp of one target: hashes of files named relative to `base`. An absent or
    unreadable stamp starts empty.

    Args:
        target: A shard's path prefix or a checkpoint folder.
        base: The folder the entries' names are relative to.
    """

    def __init__(self, target: str, base: str):
        self.target = os.path.realpath(target)
        self.path = stamp_path(target)
        self.base = base
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            with open(self.path, encoding="utf-8") as f:
                stamp = json.load(f)
            if (stamp.get("format") == STAMP_FORMAT and stamp.get("target") == self.target
                    and isinstance(stamp.get("files"), dict)):
                self.entries = stamp["files"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: everything is hashed again

    def lookup(self, name: str) -> Optional[dict]:
        """The entry of a file when it is unchanged since it was stamped.

        Args:
            name: The file, relative to `base`.

        Returns:
            The entry (identity, sha256, other facts), or None.
        """
        entry = self.entries.get(name)
        if not isinstance(entry, dict):
            return None
        try:
            identity = file_identity(os.path.join(self.base, name))
        except OSError:
            return None
        if any(entry.get(k) != v for k, v in identity.items()):
            return None
        return entry

    def record(self, name: str, identity: dict, sha256: Optional[str] = None, **extra) -> None:
        """Remember facts about a file as it was when `identity` was read (before reading it:
        a write meanwhile leaves the entry stale). Facts about the same identity are merged.

        Args:
            name: The file, relative to `base`.
            identity: Its `file_identity`, taken before the facts were computed.
            sha256: Its hex digest, when known.
            **extra: Other facts (e.g. a shard's validated token count).
        """
        entry = self.entries.get(name)
        same = isinstance(entry, dict) and all(entry.get(k) == v for k, v in identity.items())
        entry = dict(entry) if same else dict(identity)
        if sha256 is not None:
            entry["sha256"] = sha256
        entry.update(extra)
        self.entries[name] = entry
        self.changed = True

    def sha256(self, name: str) -> str:
        """A file's sha256: remembered when unchanged, else computed (and remembered).

        Args:
            name: The file, relative to `base`.

        Returns:
            The hex digest.
        """
        entry = self.lookup(name)
        if entry is not None and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        path = os.path.join(self.base, name)
        identity = file_identity(path)  # before reading: a write meanwhile makes it stale
        digest = sha256_file(path)
        self.record(name, identity, digest)
        return digest

    def save(self) -> None:
        """Write the stamp if anything was added; a folder that cannot be written is fine."""
        if not self.changed:
            return
        text = json.dumps({"format": STAMP_FORMAT, "target": self.target,
                           "files": self.entries}, sort_keys=True, indent=1) + "\n"
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            # A name of its own: several ranks may stamp the same files at the same time.
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp",
                                       dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
                raise
        except OSError as err:
            log.debug("verification stamp %s not written (%s): files are hashed on every open",
                      self.path, err)
        self.changed = False
