"""Checks of a run's outputs that would otherwise fail on rank 0 alone, mid-start-up, after the
model is built: every output folder and the metrics writer's settings, before any compute."""

from __future__ import annotations

from sara_megatron.tool_errors import check_writable_output
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.metrics import check_metrics_setup


def check_before_start(cfg: TrainConfig, rank: int) -> None:
    """Settings only rank 0 uses (the metrics writer's), checked before the model is built. On
    rank 0 only: its json_log folder need not exist on other nodes."""
    if rank == 0:
        lg = cfg.logging
        # Every output, before the model is built: not after the compute.
        if cfg.checkpoint.save_dir:
            check_writable_output(cfg.checkpoint.save_dir, "checkpoint.save_dir")
        if lg.json_log:
            check_writable_output(lg.json_log, "logging.json_log", is_file=True)
        if lg.tensorboard_dir:
            check_writable_output(lg.tensorboard_dir, "logging.tensorboard_dir")
        check_metrics_setup(lg.tensorboard_dir, lg.wandb_project, lg.json_log)

