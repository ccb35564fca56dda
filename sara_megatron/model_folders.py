"""What kind of model folder a path is, and the refusal of a folder where a Megatron-Core
checkpoint is needed.

Users mix up three folders that all hold "a model": a Hugging Face model folder (config.json and
safetensors), a Megatron-Core checkpoint (torch_dist: metadata.json, *.distcp; what
`tools/convert_hf.py import` writes and what a training run saves as `iter_N`), and a training
run's checkpoint folder (the `iter_N` checkpoints and the file naming the latest). Each tool names
the kind it was given and the kind it needs, instead of failing inside a reader.
"""

from __future__ import annotations

import os

from sara_megatron.tool_errors import UserFacingError

# What marks a Megatron-Core checkpoint (torch_dist) and a training run's save folder.
TORCH_DIST_MARKERS = ("metadata.json", "common.pt", "sara_conversion.json")
TRAINING_SAVE_MARKER = "latest_checkpointed_iteration.txt"


class NotACheckpointError(UserFacingError, ValueError):
    """A folder given where a Megatron-Core checkpoint is needed, which is something else."""


def folder_kind(path: str | os.PathLike) -> str:
    """What kind of model folder a path is.

    Args:
        path: An existing folder.

    Returns:
        "hf" (a Hugging Face model folder), "megatron" (a torch_dist checkpoint),
        "training-save" (a run's checkpoint folder holding iter_* checkpoints) or "unknown".
    """
    names = set(os.listdir(path))
    if "config.json" in names:
        return "hf"
    if (any(name.endswith(".distcp") for name in names)
            or any(marker in names for marker in TORCH_DIST_MARKERS)):
        return "megatron"
    if TRAINING_SAVE_MARKER in names or any(name.startswith("iter_") for name in names):
        return "training-save"
    return "unknown"


def newest_iteration_folder(path: str | os.PathLike) -> str:
    """The newest `iter_*` folder of a run's checkpoint folder, or a placeholder for one.

    Args:
        path: A run's checkpoint folder.
    """
    iterations = sorted(name for name in os.listdir(path) if name.startswith("iter_")
                        and not name.endswith(".tmp") and os.path.isdir(os.path.join(path, name)))
    return os.path.join(os.fspath(path), iterations[-1] if iterations else "iter_NNNNNNN")


def check_megatron_checkpoint(path: str | os.PathLike, what: str = "") -> None:
    """Refuse, saying what it is and what is needed, a folder that is not a Megatron-Core
    checkpoint.

    Args:
        path: the folder given.
        what: how the user named it (a flag or a config key), put before the path.

    Raises:
        NotACheckpointError: `path` is an HF model folder, a training run's checkpoint folder, or
            holds neither metadata.json nor *.distcp files.
    """
    path = os.fspath(path)
    named = f"{what} {path}" if what else path
    if not os.path.isdir(path):
        raise NotACheckpointError(f"{named}: no such folder (a Megatron-Core checkpoint is needed)")
    kind = folder_kind(path)
    if kind == "hf":
        raise NotACheckpointError(
            f"{named} is a Hugging Face model folder (it has config.json), not a Megatron-Core "
            f"checkpoint (torch_dist): import it with `python tools/convert_hf.py import "
            f"--hf-dir {path} --out DIR` and give DIR instead")
    if kind == "training-save":
        raise NotACheckpointError(
            f"{named} is a training run's checkpoint folder, not one checkpoint: give one of its "
            f"iteration folders, e.g. {newest_iteration_folder(path)}")
    if kind == "unknown":
        raise NotACheckpointError(
            f"{named} is not a Megatron-Core checkpoint (no metadata.json, no *.distcp files): "
            "give a folder written by `tools/convert_hf.py import` or a training run's iter_N "
            "folder")
