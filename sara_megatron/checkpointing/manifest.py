"""The checkpoint manifest: the sha256 of every file of a checkpoint folder, written when it is
saved and checked wherever it is read (model weights, resume, export).

    <checkpoint>/sara_checkpoint_manifest.json
        {"format": "sara-checkpoint-manifest/1",
         "files": {"__0_0.distcp": {"bytes": 123, "sha256": "..."}, "metadata.json": ..., ...}}

It is written inside the staging folder, before the atomic rename that publishes the checkpoint,
so a published checkpoint always has one. The files are hashed in parallel by the ranks that
saved them (each a share of the list; rank 0 writes the manifest) and again, the same way, by the
ranks that load them; a stamp (`file_stamps`, in the user's cache folder) makes a later open of
the unchanged files free.

A checkpoint written before manifests existed loads with a warning that it is not verified.
The conversion record and HF assets may be removed from a copy (export then takes --hf-dir), but
not altered; every other file must be there as saved.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from sara_megatron.checkpointing.record import ASSETS_DIR, METADATA_FILE
from sara_megatron.file_stamps import FileStamp, file_identity
from sara_megatron.io import write_json_atomic
from sara_megatron.tool_errors import UserFacingError

log = logging.getLogger(__name__)

MANIFEST_FILE = "sara_checkpoint_manifest.json"
MANIFEST_FORMAT = "sara-checkpoint-manifest/1"


class CheckpointDamagedError(UserFacingError, RuntimeError):
    """A checkpoint file is missing, cut short or altered since the checkpoint was saved.

    Args:
        folder: The checkpoint folder.
        message: The one line the user sees.
    """

    def __init__(self, folder: str, message: str):
        super().__init__(message)
        self.folder = folder


class CheckpointFormatError(UserFacingError, RuntimeError):
    """A checkpoint in a format the installed megatron-core cannot read.

    Args:
        folder: The checkpoint folder.
        message: The one line the user sees.
    """

    def __init__(self, folder: str, message: str):
        super().__init__(message)
        self.folder = folder


def check_checkpoint_format(folder: str | os.PathLike) -> None:
    """Refuse a checkpoint the installed megatron-core cannot read, before anything of it is
    loaded.

    Args:
        folder: The checkpoint folder.

    Raises:
        CheckpointFormatError: It was saved in a newer version's format.
    """
    from sara_megatron.compat.megatron_versions import unreadable_checkpoint_reason

    reason = unreadable_checkpoint_reason(folder)
    if reason is not None:
        raise CheckpointFormatError(os.fspath(folder), reason)


def _is_bookkeeping(name: str) -> bool:
    return name == MANIFEST_FILE or name.endswith(".partial")


def checkpoint_files(folder: str) -> list[str]:
    """Every file of a checkpoint (the manifest and files still being written left out).

    Args:
        folder: The checkpoint folder.

    Returns:
        Paths relative to `folder`, sorted.
    """
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if not _is_bookkeeping(rel):
                out.append(rel)
    return sorted(out)


def _group():
    """(rank, world size) of the default process group, or of this process alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hash_share(folder: str, names: list[str], rank: int, world: int) -> dict:
    """{name: (identity, sha256)} of this rank's share of `names` (the stamp remembers hashes of
    unchanged files)."""
    stamp = FileStamp(folder, folder)
    share = {}
    for name in names[rank::world]:
        identity = file_identity(os.path.join(folder, name))
        share[name] = (identity, stamp.sha256(name))
    return share


def _save_stamp(folder: str, shares: list[dict]) -> None:
    stamp = FileStamp(folder, folder)
    for share in shares:
        for name, (identity, digest) in share.items():
            stamp.record(name, identity, digest)
    stamp.save()


def move_stamp(old_folder: str, new_folder: str) -> None:
    """Carry the verification stamp of a folder renamed (a save's staging folder published):
    its files are the same files.

    Args:
        old_folder: The folder's former path.
        new_folder: Its path now.
    """
    old = FileStamp(old_folder, old_folder)
    if old.entries:
        new = FileStamp(new_folder, new_folder)
        new.entries.update(old.entries)
        new.changed = True
        new.save()
    try:
        os.remove(old.path)
    except OSError:
        pass


def write_checkpoint_manifest(folder: str, collective: Optional[bool] = None) -> None:
    """Hash every file of a checkpoint and write its manifest.

    Args:
        folder: The checkpoint folder, complete.
        collective: None or True: collective over the default process group when one exists
            (rank 0 lists and writes, every rank hashes a share); False: this process does it
            all.
    """
    rank, world = _group() if collective in (None, True) else (0, 1)
    names = checkpoint_files(folder) if rank == 0 else None
    if world > 1:
        names = _broadcast(names)  # after rank 0's last file is written
    share = _hash_share(folder, names, rank, world)
    shares = _gather(share) if world > 1 else [share]
    if rank == 0:
        files = {name: {"bytes": identity["size"], "sha256": digest}
                 for s in shares for name, (identity, digest) in s.items()}
        write_json_atomic(os.path.join(folder, MANIFEST_FILE),
                          {"format": MANIFEST_FORMAT, "files": dict(sorted(files.items()))})
        _save_stamp(folder, shares)
    if world > 1:
        # No rank returns before the manifest exists: a rank that went on to verify or load the
        # checkpoint would otherwise find none and leave the collectives the others enter.
        _broadcast(None)


def read_manifest(folder: str) -> Optional[dict]:
    """A checkpoint's manifest.

    Args:
        folder: The checkpoint folder.

    Returns:
        Its file entries (name -> {"bytes", "sha256"}), or None when the checkpoint has no
        manifest (older than manifests).

    Raises:
        CheckpointDamagedError: A manifest that cannot be read.
    """
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    import json

    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamagedError(folder, f"checkpoint {folder} is damaged: its manifest "
                                     f"{path} cannot be read ({err})") from None
    return files


def _problems(folder: str, files: dict, names: list[str], rank: int, world: int
              ) -> tuple[list[str], dict]:
    """(what is wrong with this rank's share of `names`, the stamp entries it hashed)."""
    stamp = FileStamp(folder, folder)
    problems, mine = [], names[rank::world]
    for name in mine:
        path = os.path.join(folder, name)
        expected = files[name]
        if not os.path.isfile(path):
            if name != METADATA_FILE and not name.startswith(ASSETS_DIR + os.sep):
                problems.append(f"{path} is missing")
        elif os.path.getsize(path) != expected["bytes"]:
            size = os.path.getsize(path)
            problems.append(f"{path} has {size} bytes, the manifest {expected['bytes']} ("
                            + ("cut short)" if size < expected["bytes"] else "grown)"))
        elif stamp.sha256(name) != expected["sha256"]:
            problems.append(f"{path}: its sha256 differs from the manifest's (altered since "
                            "it was saved)")
    return problems, {n: stamp.entries[n] for n in mine if n in stamp.entries}


def verify_checkpoint(folder: str | os.PathLike, collective: Optional[bool] = None) -> bool:
    """Check that the installed megatron-core reads the checkpoint's format
    (`check_checkpoint_format`) and every file of it against its manifest.

    Args:
        folder: The checkpoint folder.
        collective: As `write_checkpoint_manifest` (each rank hashes a share).

    Returns:
        True when every file matches; False (after a warning) for a checkpoint without a
        manifest.

    Raises:
        CheckpointFormatError: A format the installed megatron-core cannot read.
        CheckpointDamagedError: Naming the first damaged file.
    """
    folder = os.fspath(folder)
    check_checkpoint_format(folder)
    rank, world = _group() if collective in (None, True) else (0, 1)
    if world > 1:
        # Rank 0 reads and every rank follows its answer: ranks that saw the folder at different
        # moments must still take the same collectives below.
        outcome = None
        if rank == 0:
            try:
                outcome = ("read", read_manifest(folder))
            except CheckpointDamagedError as error:
                outcome = ("damaged", str(error))
        outcome = _broadcast(outcome)
        if outcome[0] == "damaged":
            raise CheckpointDamagedError(folder, outcome[1])
        files = outcome[1]
    else:
        files = read_manifest(folder)
    if files is None:
        if rank == 0:
            log.warning("%s has no %s (saved before checkpoints recorded one): its files are "
                        "not verified", folder, MANIFEST_FILE)
        return False
    names = sorted(files)
    problems, entries = _problems(folder, files, names, rank, world)
    if world > 1:
        gathered = _gather((problems, entries))
        problems = [p for share, _ in gathered for p in share]
        entries = {k: v for _, share in gathered for k, v in share.items()}
    if rank == 0:  # one writer of the stamp
        stamp = FileStamp(folder, folder)
        if any(stamp.entries.get(k) != v for k, v in entries.items()):
            stamp.entries.update(entries)
            stamp.changed = True
            stamp.save()
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise CheckpointDamagedError(
            folder, f"checkpoint {folder} is damaged: {sorted(problems)[0]}{more}")
    return True
