"""Checks of a token shard where it is read (training, prior extraction, the divergence analysis).

Always (cheap): the three files exist; the `.idx` is a Megatron index whose size matches the
sequence count it declares; the `.bin` holds exactly the tokens the index points to; the rows of
`.samples.jsonl` and of the index are as many as the manifest says; every token id is below the
tokenizer's vocabulary size (one vectorised pass over the `.bin`).
On the first open (unless verification is switched off): the sha256 of each file against the one
the manifest recorded when the shard was written. A stamp per shard (`file_stamps`, in the
user's cache folder) remembers both results for unchanged files, so later opens read nothing.

A damaged shard raises `ShardDamagedError` naming the file, what is wrong and how to rebuild it.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from sara_megatron.file_stamps import FileStamp, file_identity
from sara_megatron.tool_errors import UserFacingError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
_INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                 6: np.float64, 7: np.float32, 8: np.uint16}
_HEADER = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
SHARD_FILES = ("bin", "idx", "samples")


class ShardDamagedError(UserFacingError, ValueError):
    """A token shard file is missing, cut short or altered."""


def shard_paths(root: str, prefix: str) -> dict[str, str]:
    """The files of a shard: {"bin", "idx", "samples"} -> path.

    Args:
        root: The shard directory.
        prefix: The shard's prefix (`token_shards.shard_prefix`).
    """
    base = os.path.join(root, prefix)
    return {"bin": base + ".bin", "idx": base + ".idx", "samples": base + ".samples.jsonl"}


def _damaged(root: str, prefix: str, path: str, what: str) -> ShardDamagedError:
    marker = os.path.join(root, prefix) + ".done.json"
    return ShardDamagedError(
        f"token shard file {path} is damaged: {what}. Rebuild the shard: delete {marker} and "
        f"re-run tools/shard_corpus.py with the arguments that wrote {root} (it rewrites that "
        "shard only), or shard the corpus again into a new --output"
    )


def read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """Read a Megatron `.idx` file.

    Args:
        idx_path: The file.

    Returns:
        (token dtype, sequence lengths [n], sequence byte offsets [n]).

    Raises:
        ValueError: Saying what does not fit.
    """
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER)
        if len(header) < _HEADER or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ValueError("not a Megatron index (bad header)")
        (code,) = struct.unpack("<B", header[17:18])
        count, documents = struct.unpack("<QQ", header[18:34])
        if code not in _INDEX_DTYPES:
            raise ValueError(f"unknown token dtype code {code}")
        expected = _HEADER + count * (4 + 8) + documents * 8
        if size not in (expected, expected + count):  # + an int8 mode per sequence
            raise ValueError(f"{size} bytes, but its header declares {count} sequences and "
                             f"{documents} documents ({expected} bytes)")
        lengths = np.frombuffer(f.read(count * 4), dtype=np.int32)
        pointers = np.frombuffer(f.read(count * 8), dtype=np.int64)
    return np.dtype(_INDEX_DTYPES[code]), lengths, pointers


def _token_range(bin_path: str, dtype: np.dtype) -> tuple[int, int]:
    """(smallest, largest) token id of a `.bin`, in one vectorised pass."""
    if os.path.getsize(bin_path) == 0:
        return 0, -1
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    try:
        return int(tokens.min()), int(tokens.max())
    finally:
        del tokens


def check_shard(root: str, shard: dict, vocab_size: int, check_hash: bool = True
                ) -> dict[str, str] | None:
    """Check one shard: its files present, index and token ids sound, and with `check_hash`
    their sha256 against the manifest (remembered for unchanged files).

    Args:
        root: The shard directory.
        shard: The shard's manifest entry.
        vocab_size: Every token id must be below it.
        check_hash: Compare the files' sha256 with the manifest's.

    Returns:
        The sha256 of each of its files (all equal to the manifest's) when `check_hash`, else
        None.

    Raises:
        ShardDamagedError: Naming the file and what is wrong.
    """
    prefix = shard["prefix"]
    paths = shard_paths(root, prefix)
    for path in paths.values():
        if not os.path.isfile(path):
            raise _damaged(root, prefix, path, "the file is missing")
    stamp = FileStamp(os.path.join(root, prefix), os.path.dirname(paths["bin"]))
    names = {key: os.path.basename(path) for key, path in paths.items()}
    try:
        bin_entry, idx_entry = stamp.lookup(names["bin"]), stamp.lookup(names["idx"])
        if not (bin_entry and idx_entry and bin_entry.get("tokens_below") == vocab_size
                and idx_entry.get("structure_checked")):
            identities = {key: file_identity(paths[key]) for key in ("bin", "idx")}
            _check_structure(root, shard, paths, vocab_size)
            stamp.record(names["bin"], identities["bin"], tokens_below=vocab_size)
            stamp.record(names["idx"], identities["idx"], structure_checked=True)
        if not check_hash:
            return None
        hashes = {key: stamp.sha256(names[key]) for key in SHARD_FILES}
        for key in SHARD_FILES:
            if hashes[key] != shard["sha256"][key]:
                raise _damaged(root, prefix, paths[key], "its sha256 differs from the one the "
                               "manifest recorded when it was written")
        return hashes
    finally:
        stamp.save()


def shard_content_hashes(root: str, shard: dict) -> dict[str, str]:
    """The sha256 of each file of a shard as it is on disk (remembered for unchanged files),
    compared with nothing.

    Args:
        root: The shard directory.
        shard: The shard's manifest entry.
    """
    paths = shard_paths(root, shard["prefix"])
    stamp = FileStamp(os.path.join(root, shard["prefix"]), os.path.dirname(paths["bin"]))
    try:
        return {key: stamp.sha256(os.path.basename(paths[key])) for key in SHARD_FILES}
    except FileNotFoundError as err:
        raise _damaged(root, shard["prefix"], err.filename, "the file is missing") from None
    finally:
        stamp.save()


def _check_structure(root: str, shard: dict, paths: dict, vocab_size: int) -> None:
    prefix = shard["prefix"]
    try:
        dtype, lengths, pointers = read_index(paths["idx"])
    except ValueError as err:
        raise _damaged(root, prefix, paths["idx"], str(err)) from None
    if len(lengths) != shard["samples"]:
        raise _damaged(root, prefix, paths["idx"], f"it indexes {len(lengths)} samples, the "
                       f"manifest says {shard['samples']}")
    expected_bytes = int(pointers[-1] + lengths[-1] * dtype.itemsize) if len(lengths) else 0
    actual = os.path.getsize(paths["bin"])
    if actual != expected_bytes:
        raise _damaged(root, prefix, paths["bin"],
                       f"{actual} bytes, but its index points to {expected_bytes} "
                       f"({'cut short' if actual < expected_bytes else 'extra bytes'})")
    if "tokens" in shard and int(lengths.astype(np.int64).sum()) != shard["tokens"]:
        raise _damaged(root, prefix, paths["idx"], "its sequence lengths do not add up to the "
                       f"manifest's {shard['tokens']} tokens")
    low, high = _token_range(paths["bin"], dtype)
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise _damaged(root, prefix, paths["bin"], f"token id {bad} is outside the tokenizer's "
                       f"vocabulary (0..{vocab_size - 1})")
