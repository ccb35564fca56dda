"""Checkpoints through megatron-core's `dist_checkpointing` (torch_dist format)."""

from sara_megatron.checkpointing.model import (
    check_recorded_architecture,
    load_model_weights,
    save_model_weights,
)

__all__ = ["check_recorded_architecture", "load_model_weights", "save_model_weights"]
