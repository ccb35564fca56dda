"""SARA fine-tuning on Megatron-Core: config, trainer, checkpoints, metrics."""

from sara_megatron.training.config import TrainConfig, load_train_config
from sara_megatron.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_train_config", "train"]
