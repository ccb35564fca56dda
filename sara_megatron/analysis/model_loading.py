"""Weights for an analysis from any checkpoint: a Megatron one (converted or trained, any layout)
or an exported / hub HF folder, read in memory through the converter's mapping."""

from __future__ import annotations

import os


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an HF model folder: config.json beside safetensors weights (one file or
    an index).

    Args:
        path: An existing folder.
    """
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, "config.json"))
            and any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
                    for name in os.listdir(path)))


def load_analysis_weights(model, checkpoint: str | os.PathLike) -> str:
    """Fill `model` with a checkpoint's weights (collective on a parallel layout).

    Args:
        model: The built Megatron model.
        checkpoint: An HF folder or a Megatron checkpoint.

    Returns:
        "hf" or "megatron": which kind of checkpoint was read.
    """
    if is_hf_folder(checkpoint):
        from sara_megatron.conversion.hf_import import load_hf_weights

        load_hf_weights(model, checkpoint)
        return "hf"
    from sara_megatron.checkpointing import load_model_weights

    load_model_weights(model, checkpoint)
    return "megatron"


def default_tokenizer_folder(checkpoint: str | os.PathLike) -> str | None:
    """Where a checkpoint keeps its tokenizer: an HF folder itself, a converted checkpoint's
    hf_assets/ (copied there at import); None when neither holds one.

    Args:
        checkpoint: An HF folder or a Megatron checkpoint.
    """
    checkpoint = os.fspath(checkpoint)
    for folder in (checkpoint, os.path.join(checkpoint, "hf_assets")):
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return folder
    return None
