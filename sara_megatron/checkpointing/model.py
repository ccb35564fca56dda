"""Model weights as a layout-independent `dist_checkpointing` checkpoint.

A checkpoint written at one TP/EP/PP layout loads at any other: megatron's sharded state dict
names every tensor by its global key and offset (experts by global id, layers by global index).
"""

from __future__ import annotations

import os

import torch


def _sharded_state_dict(model) -> dict:
    # Every model chunk of a virtual-pipeline rank contributes its own layers.
    chunks = model if isinstance(model, (list, tuple)) else [model]
    state = {}
    for chunk in chunks:
        state.update(chunk.sharded_state_dict(prefix=""))
    return state


def save_model_weights(model, checkpoint_dir: str | os.PathLike) -> None:
    """Collective: every rank of the world calls it with its model shard."""
    from megatron.core import dist_checkpointing

    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(model), os.fspath(checkpoint_dir))


@torch.no_grad()
def load_model_weights(model, checkpoint_dir: str | os.PathLike, strict: bool = True) -> None:
    """Collective: load this rank's shards of every tensor into `model` (any layout)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sharded = _sharded_state_dict(model)
    # Tensors the checkpoint holds beyond the model's (a training checkpoint's optimizer state)
    # are fine; requested tensors it lacks raise.
    loaded = dist_checkpointing.load(
        sharded,
        os.fspath(checkpoint_dir),
        strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.ASSUME_OK_UNEXPECTED,
    )
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        # The key set once: state_dict() walks the whole module (quadratic inside the loop).
        keys = set(chunk.state_dict(keep_vars=True))
        own = {k: v for k, v in loaded.items() if k in keys}
        missing, unexpected = chunk.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and missing:
            raise RuntimeError(f"checkpoint {checkpoint_dir} lacks tensors: {missing}")
