"""Model weights as a layout-independent `dist_checkpointing` checkpoint.

A checkpoint written at one TP/EP/PP layout loads at any other: megatron's sharded state dict
names every tensor by its global key and offset (experts by global id, layers by global index).
Every save writes the folder's manifest of file hashes and every load checks it first
(`checkpointing.manifest`): a damaged file is named before any tensor is read.
"""

from __future__ import annotations

import json
import os

import torch

from sara_megatron.checkpointing.manifest import verify_checkpoint, write_checkpoint_manifest
from sara_megatron.checkpointing.record import architecture_record, read_metadata
from sara_megatron.model_folders import check_megatron_checkpoint


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_state_dict(model) -> dict:
    """The model's sharded tensors, nested per chunk. The chunks of a virtual-pipeline rank name
    their layers locally (decoder.layers.0. ... in every chunk, each at other global offsets), so
    a flat dict would keep only the last chunk's; the checkpoint keys are global either way, so
    a checkpoint written with any number of chunks loads into any other."""
    return {f"chunk{i}": chunk.sharded_state_dict(prefix="") for i, chunk in enumerate(_chunks(model))}


def save_model_weights(model, checkpoint_dir: str | os.PathLike) -> None:
    """Save a model's weights as a torch_dist checkpoint, then its manifest. Collective: every
    rank of the world calls it with its model shard.

    Args:
        model: This rank's model chunks (a module or a list of virtual-pipeline chunks).
        checkpoint_dir: The checkpoint folder (created).
    """
    from megatron.core import dist_checkpointing

    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(model), os.fspath(checkpoint_dir))
    write_checkpoint_manifest(os.fspath(checkpoint_dir))


def check_recorded_architecture(arch, checkpoint_dir: str | os.PathLike) -> None:
    """Refuse a model whose architecture differs from the one the checkpoint records (its
    `sara_conversion.json`, written by import and carried into training saves). Tensor shapes do
    not catch it all: a norm epsilon, a rope scaling or a router setting load into the same
    shapes, and megatron loads a larger vocabulary's embedding into a smaller one's rows.
    Checkpoints without a record (trained from a preset's random weights) are not checked; a
    folder that is no Megatron-Core checkpoint (an HF model folder) is refused, named as what it
    is (`model_folders.NotACheckpointError`).

    Args:
        arch: The model's architecture (`models.architecture.MoEArchitecture`).
        checkpoint_dir: The checkpoint folder.

    Raises:
        ValueError: The architectures differ (each differing field named).
        NotACheckpointError: A folder that is no Megatron-Core checkpoint.
    """
    check_megatron_checkpoint(checkpoint_dir)
    record = read_metadata(os.fspath(checkpoint_dir))
    recorded = (record or {}).get("architecture")
    if not recorded:
        return
    given = json.loads(json.dumps(architecture_record(arch)))  # tuples as the JSON lists
    differences = [
        f"{key}: checkpoint {recorded.get(key)!r}, model {value!r}"
        for key, value in given.items()
        if key in recorded and value != recorded[key]
    ]
    if differences:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_dir)} was made for another model configuration ("
            + "; ".join(differences)
            + "): build the model from the checkpoint's own config (its hf_assets/config.json)"
        )


def _built_architecture(chunk):
    """The architecture `models.builder.build_model` recorded on the model, under any wrappers
    (DDP, Float16Module) that keep it as `.module`."""
    while chunk is not None:
        arch = getattr(chunk, "sara_architecture", None)
        if arch is not None:
            return arch
        chunk = getattr(chunk, "module", None)
    return None


@torch.no_grad()
def load_model_weights(model, checkpoint_dir: str | os.PathLike, strict: bool = True) -> None:
    """Load this rank's shards of every tensor into a model (any layout), after the files'
    check (`verify_checkpoint`) and `check_recorded_architecture` on the architecture the model
    was built from. Collective.

    Args:
        model: This rank's model chunks (a module or a list of virtual-pipeline chunks).
        checkpoint_dir: The checkpoint folder.
        strict: Raise for a tensor of the model the checkpoint lacks (tensors the checkpoint
            holds beyond the model's are fine either way).

    Raises:
        RuntimeError: With `strict`, tensors the checkpoint lacks.
        CheckpointDamagedError, CheckpointFormatError, NotACheckpointError, ValueError: As the
            checks above.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    chunks = _chunks(model)
    check_megatron_checkpoint(checkpoint_dir)  # on every rank alike: before any collective
    verify_checkpoint(checkpoint_dir)  # collective: each rank hashes a share of the files
    arch = _built_architecture(chunks[0])
    if arch is not None:
        check_recorded_architecture(arch, checkpoint_dir)
    sharded = _sharded_state_dict(model)
    # Tensors the checkpoint holds beyond the model's (a training checkpoint's optimizer state)
    # are fine; requested tensors it lacks raise.
    loaded = dist_checkpointing.load(
        sharded,
        os.fspath(checkpoint_dir),
        strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.ASSUME_OK_UNEXPECTED,
    )
    for i, chunk in enumerate(chunks):
        # The key set once: state_dict() walks the whole module (quadratic inside the loop).
        keys = set(chunk.state_dict(keep_vars=True))
        own = {k: v for k, v in loaded[f"chunk{i}"].items() if k in keys}
        missing, unexpected = chunk.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and missing:
            raise RuntimeError(f"checkpoint {checkpoint_dir} lacks tensors: {missing}")
