"""SARA fine-tuning on Megatron-Core: L = CE(response tokens) + λ_LB·LB + λ_JS·L_JS.

The loop, top to bottom: check the run (`preflight`), build its state (`build_state`: model,
optimizer, schedule, data, checkpointer), then for each step fetch the global batch, run forward
and backward (megatron's pipeline schedule, `step.py`), step the optimizer and the schedule, log,
stop on a non-finite loss, and save as configured.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch.distributed as dist

from sara_megatron.distributed import initialize_distributed, model_process_groups, set_seed
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.metrics import MetricsWriter
from sara_megatron.training.preflight import preflight, sara_settings
from sara_megatron.training.state import TrainState, build_state
from sara_megatron.training.step import (  # noqa: F401 - NonFiniteError: the trainer's error
    NonFiniteError,
    StepRecord,
    check_finite,
    fetch_microbatches,
    forward_backward,
    prepare_batch,
    step_record,
)


@dataclasses.dataclass
class TrainResult:
    """What `Trainer.run` did.

    Attributes:
        steps: The `StepRecord` of every step run in this call.
        final_iteration: The global step reached.
        alignment_layers: The layers SARA aligned.
    """
    steps: list  # StepRecord of every step run in this call
    final_iteration: int
    alignment_layers: list


class Trainer:
    """A run of a `TrainConfig`: checked and built on construction; `run()` trains.

    Construction is collective: it initialises the process groups (`initialize_distributed`),
    runs `preflight` and builds the state (resumed from the latest checkpoint when configured).

    Args:
        cfg: The run's config.

    Raises:
        PreflightError: The settings cannot start a run (every problem, in one message).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        initialize_distributed(cfg.parallel, seed=cfg.seed)
        process_groups = model_process_groups()  # megatron's parallel state, read once here
        self.plan = preflight(cfg)  # one error naming every problem, before anything is built
        self.state: TrainState = build_state(cfg, self.plan, process_groups)

    def train_step(self) -> StepRecord:
        """One optimizer step on the next global batch (collective), reseeded from (seed, step).

        Returns:
            The step's `StepRecord`.

        Raises:
            RuntimeError: The data ran out, or the optimizer step failed.
        """
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        # RNG from (seed, step): a resumed run draws what an uninterrupted one would.
        set_seed(cfg.seed + state.iteration)
        microbatches = fetch_microbatches(state, self.plan.num_microbatches)
        batch = prepare_batch(state, cfg, microbatches)
        reduced = forward_backward(state, cfg, batch)
        lr = float(state.optimizer.param_groups[0]["lr"])  # the rate this step uses
        ok, grad_norm, _ = state.optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {state.iteration} failed (non-finite gradients?)")
        state.scheduler.step(increment=1)
        state.iteration += 1
        state.consumed_samples += cfg.data.global_batch_size
        return step_record(state, cfg, batch, reduced, lr, grad_norm, started)

    def run(self, max_steps: Optional[int] = None) -> TrainResult:
        """Train to the end of the schedule (or `max_steps` more steps); log on rank 0, stop on a
        non-finite step, and save as configured (every run ends saved when save_dir is set).

        Args:
            max_steps: At most this many steps in this call (None: to the schedule's end).

        Returns:
            The `TrainResult` of this call.

        Raises:
            NonFiniteError: A step's loss or gradient norm was not finite (nothing saved after it).
        """
        state, lg = self.state, self.cfg.logging
        checkpointer = state.checkpointer
        total = self.plan.train_steps
        end = total if max_steps is None else min(total, state.iteration + max_steps)
        writer = None
        if dist.get_rank() == 0:
            writer = MetricsWriter(total, lg.tensorboard_dir, lg.wandb_project, lg.json_log,
                                   self.cfg.to_dict(), start_step=state.iteration)
        records = []
        try:
            while state.iteration < end:
                record = self.train_step()
                records.append(record)
                if writer and (state.iteration % lg.log_interval == 0 or state.iteration == end):
                    writer.write(record.step, dict(
                        ce=record.ce, lb=record.lb, js=record.js, lr=record.lr,
                        grad_norm=record.grad_norm, tokens_per_s=record.tokens_per_s,
                        step_time_s=record.step_time_s, tflops_per_gpu=record.tflops_per_gpu,
                        **record.terms,
                    ), record.js_per_layer)
                check_finite(record, self.cfg)  # before a save could keep a broken step
                if checkpointer.due(state.iteration):
                    checkpointer.save(state)
            if checkpointer.due_at_end(state.iteration):
                checkpointer.save(state)
        finally:
            if writer:
                writer.close()
        return TrainResult(records, state.iteration, self.plan.alignment_layers)

    def save(self) -> None:
        """Collective. Save a checkpoint of the current state now."""
        self.state.checkpointer.save(self.state)

    # The state's parts under the names scripts and tests use.

    @property
    def chunks(self) -> list:
        """The DDP-wrapped model chunks of this rank, one per virtual pipeline stage."""
        return self.state.chunks

    @property
    def optimizer(self):
        """The megatron optimizer."""
        return self.state.optimizer

    @property
    def scheduler(self):
        """The LR scheduler (megatron's `OptimizerParamScheduler`)."""
        return self.state.scheduler

    @property
    def device(self):
        """The torch device the model runs on."""
        return self.state.device

    @property
    def arch(self):
        """The model's `MoEArchitecture` (cut to model.num_layers when set)."""
        return self.plan.arch

    @property
    def alignment_layers(self) -> list:
        """The layers SARA aligns."""
        return self.plan.alignment_layers

    @property
    def train_steps(self) -> int:
        """The schedule's length in steps."""
        return self.plan.train_steps

    @property
    def iteration(self) -> int:
        """The global step reached (steps done, counting those before a resume)."""
        return self.state.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        """Set the global step.

        Args:
            value: The new step.
        """
        self.state.iteration = value

    @property
    def consumed_samples(self) -> int:
        """Positions of the global sample order consumed so far."""
        return self.state.consumed_samples

    @property
    def batches(self):
        """The iterator of micro-batches the steps draw from."""
        return self.state.batches

    @batches.setter
    def batches(self, value) -> None:  # a test feeds its own micro-batches
        """Replace the micro-batch iterator.

        Args:
            value: An iterator of micro-batches.
        """
        self.state.batches = value

    def _next_microbatches(self) -> list:
        return fetch_microbatches(self.state, self.plan.num_microbatches)

    def _sara_settings(self) -> dict:
        return sara_settings(self.cfg, self.plan)


def train(cfg: TrainConfig, max_steps: Optional[int] = None) -> TrainResult:
    """Build a `Trainer` for `cfg` and run it.

    Args:
        cfg: The run's config.
        max_steps: At most this many steps (None: the whole schedule).

    Returns:
        The run's `TrainResult`.
    """
    return Trainer(cfg).run(max_steps)
