"""Remembered hashes: a small JSON stamp beside files that were hashed, so that later opens of
the same, unchanged files need not read them again.

    {"format": "sara-file-stamp/1",
     "files": {"en-00000.bin": {"size": 81920, "mtime_ns": ..., "ctime_ns": ..., "inode": ...,
                                "sha256": "...", ...}}}

An entry is trusted only while the file's size, modification time, change time and inode are all
as recorded; any write to the file changes its change time (which, unlike the modification time,
no program can set back), and a replaced file has another inode, so a changed file is hashed
again. A stamp that cannot be read is ignored; one that cannot be written (a read-only folder) is
not an error: the files are then hashed on every open.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional

from sara_megatron.data.atomic_files import sha256_file

log = logging.getLogger(__name__)

STAMP_FORMAT = "sara-file-stamp/1"


def file_identity(path: str) -> dict:
    """What a stamp entry must match for the file to count as unchanged."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


class FileStamp:
    """The stamp file `path`: hashes of files named relative to `base`."""

    def __init__(self, path: str, base: str):
        self.path = path
        self.base = base
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            with open(path, encoding="utf-8") as f:
                stamp = json.load(f)
            if stamp.get("format") == STAMP_FORMAT and isinstance(stamp.get("files"), dict):
                self.entries = stamp["files"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: everything is hashed again

    def lookup(self, name: str) -> Optional[dict]:
        """The entry of `name` when the file is unchanged since it was stamped, else None."""
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
        """Remember facts about the file as it was when `identity` was read (before reading it:
        a write meanwhile leaves the entry stale). Facts about the same identity are merged."""
        entry = self.entries.get(name)
        same = isinstance(entry, dict) and all(entry.get(k) == v for k, v in identity.items())
        entry = dict(entry) if same else dict(identity)
        if sha256 is not None:
            entry["sha256"] = sha256
        entry.update(extra)
        self.entries[name] = entry
        self.changed = True

    def sha256(self, name: str) -> str:
        """The file's sha256: remembered when unchanged, else computed (and remembered)."""
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
        text = json.dumps({"format": STAMP_FORMAT, "files": self.entries}, sort_keys=True,
                          indent=1) + "\n"
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
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
