"""Checks made before the process group starts: the parallel layout against the model and the
world (on every rank, before any collective), and the run's outputs that would otherwise fail on
rank 0 alone, mid-start-up, after the model is built: every output folder and the metrics
writer's settings, before any compute."""

from __future__ import annotations

from sara_megatron.tool_errors import check_writable_output
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.metrics import check_metrics_setup


def check_parallel_layout(cfg: TrainConfig, world_size: int) -> None:
    """Refuse a `parallel` section that does not divide the model (experts, heads, layers) or the
    world, naming the model's sizes first: on every rank alike, before the process group starts.
    A model that cannot be resolved is left to the preflight, which names it.

    Args:
        cfg: The run's config (`parallel`, `model.preset`, `model.num_layers`).
        world_size: The number of processes.

    Raises:
        PreflightError: the layout does not fit.
    """
    import dataclasses

    from sara_megatron.models.architecture import resolve_architecture
    from sara_megatron.training.preflight import PreflightError

    par = cfg.parallel
    try:
        arch = resolve_architecture(cfg.model.preset)
    except (ValueError, OSError):
        arch = None
    if arch is not None and cfg.model.num_layers and 1 <= cfg.model.num_layers <= arch.num_layers:
        arch = dataclasses.replace(arch, num_layers=cfg.model.num_layers)
    try:
        if arch is not None:
            arch.validate_parallel(tp=par.tp, ep=par.ep, pp=par.pp, vpp=par.vpp)
        par.validate_world(world_size)
    except ValueError as err:
        raise PreflightError([f"parallel (tp {par.tp}, ep {par.ep}, pp {par.pp}, cp {par.cp}): "
                              f"{err}"]) from None


def check_before_start(cfg: TrainConfig, rank: int, world_size: int) -> None:
    """The parallel layout (every rank), then settings only rank 0 uses (the metrics writer's),
    checked before the model is built; those on rank 0 only: its json_log folder need not exist
    on other nodes.

    Args:
        cfg: The run's config.
        rank: This process's global rank.
        world_size: The number of processes.

    Raises:
        PreflightError: The layout does not fit.
        OutputNotWritableError: An output folder or file is not writable.
        RuntimeError: A metrics setting cannot be used (`check_metrics_setup`).
    """
    check_parallel_layout(cfg, world_size)
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

