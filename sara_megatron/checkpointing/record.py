"""The record a model checkpoint carries beside megatron's files: `sara_conversion.json`, what
model the weights were made for (written by the HF import, carried into every training save), and
`hf_assets/`, the HF folder's non-weight files.

The record is checked before weights load (`check_recorded_architecture`) and names the source a
prior store was extracted from (`priors.fingerprint`); its other fields are conversion's
(`conversion.hf_import` writes them).
"""

from __future__ import annotations

import dataclasses
import json
import os

from sara_megatron.tool_errors import UserFacingError

METADATA_FILE = "sara_conversion.json"
ASSETS_DIR = "hf_assets"
FORMAT = "sara-megatron/hf-conversion"
FORMAT_VERSION = 1


class CheckpointRecordError(UserFacingError, ValueError):
    """A record this code cannot read (another format or a newer version)."""


def architecture_record(arch) -> dict:
    """The architecture a checkpoint records: every field of `arch` but its HF config.

    Args:
        arch: A `models.architecture.MoEArchitecture`.
    """
    record = dataclasses.asdict(arch)
    record.pop("hf_config", None)
    return record


def kept_hf_config(checkpoint: str) -> str | None:
    """The HF config.json the converter kept beside a checkpoint's weights.

    Args:
        checkpoint: The checkpoint folder.

    Returns:
        Its path, or None (a checkpoint not made by tools/convert_hf.py: its model must then
        be named).
    """
    path = os.path.join(checkpoint, ASSETS_DIR, "config.json")
    return path if os.path.isfile(path) else None


def write_metadata(folder: str, record: dict) -> None:
    """Write a checkpoint's record (format and version added) beside its weights.

    Args:
        folder: The checkpoint folder.
        record: What to record (e.g. {"architecture": `architecture_record(arch)`}).
    """
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **record}
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=False)
        f.write("\n")


def read_metadata(folder: str) -> dict | None:
    """A checkpoint's record.

    Args:
        folder: The checkpoint folder.

    Returns:
        The record, or None when the checkpoint has none.

    Raises:
        CheckpointRecordError: Another format, or a newer format version.
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise CheckpointRecordError(
            f"{path} is not a {FORMAT} file (format={record.get('format')!r})")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointRecordError(
            f"{path} has format version {record['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}"
        )
    return record
