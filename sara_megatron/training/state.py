"""A run's state, built in one place from its config and `RunPlan`: the model chunks (DDP), the
optimizer, the LR schedule at its real length, the objectives, the data loader and the
checkpointer; resumed from the plan's checkpoint, or started from `model.checkpoint`'s weights.

Built from megatron-core parts: `DistributedDataParallel`, `get_megatron_optimizer` (Adam with
decoupled weight decay, optionally the distributed optimizer), `OptimizerParamScheduler`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import torch

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.compat.megatron_versions import forget_aux_losses
from sara_megatron.models.builder import ModelOptions, build_model
from sara_megatron.peft import apply_lora
from sara_megatron.peft.runs import lora_settings, peft_record
from sara_megatron.training.checkpoint import (
    check_optimizer_layout,
    load_training_checkpoint,
    save_training_checkpoint,
)
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.objectives import Objective, objective_class
from sara_megatron.training.preflight import (
    RunPlan,
    data_stream,
    sara_settings,
    scheduler_settings,
)


@dataclasses.dataclass
class Checkpointer:
    """When the run saves, and what each save records beside the tensors: the data position and
    stream, and the SARA term (checked or compared on resume, see training.preflight)."""

    save_dir: Optional[str]
    save_interval: int  # steps; 0 = only at the end
    record: dict  # data stream and SARA settings
    conversion_source: Optional[str]  # model.checkpoint, whose conversion record saves carry
    # LoRA: only the trained parameters (adapters, router) and their optimizer state are saved;
    # the base stays in model.checkpoint.
    trainable_only: bool = False
    write_files: Any = None  # (folder) -> None, on rank 0: an objective's files beside the weights

    def due(self, iteration: int) -> bool:
        """Whether the interval saves at `iteration` (never with no save_dir or interval 0).

        Args:
            iteration: The step just finished.
        """
        return bool(self.save_dir and self.save_interval and iteration % self.save_interval == 0)

    def due_at_end(self, iteration: int) -> bool:
        """Whether the run's last step needs a save of its own: the interval did not save it
        (every run ends saved).

        Args:
            iteration: The run's last step.
        """
        return bool(self.save_dir and (not self.save_interval or iteration % self.save_interval))

    def save(self, state: "TrainState") -> None:
        """Collective. Save `state` at its iteration with the data position and this record.

        Args:
            state: The run's state (chunks, optimizer, scheduler, iteration, consumed samples).
        """
        save_training_checkpoint(
            self.save_dir, state.iteration, state.chunks, state.optimizer, state.scheduler,
            dict(consumed_samples=state.consumed_samples, **self.record),
            conversion_source=self.conversion_source, trainable_only=self.trainable_only,
            write_files=self.write_files,
        )


@dataclasses.dataclass
class TrainState:
    """Everything a training step reads or advances."""

    plan: RunPlan
    device: torch.device
    chunks: list  # DDP-wrapped model chunks, one per virtual pipeline stage
    model_config: Any  # megatron's TransformerConfig, shared by the chunks
    optimizer: Any
    scheduler: Any
    loader: Any
    batches: Iterator
    checkpointer: Checkpointer
    # the run's objectives (training.objectives): the one sara.objective names, when it builds
    # a term (SARA at λ_JS = 0 with priors: the same code path as λ_JS > 0)
    objectives: list[Objective] = dataclasses.field(default_factory=list)
    process_groups: Any = None  # megatron's ProcessGroupCollection, for what runs collectives
    iteration: int = 0
    consumed_samples: int = 0


def build_state(cfg: TrainConfig, plan: RunPlan, process_groups=None) -> TrainState:
    """The run's state for a config that passed `preflight`.

    The model is built first: its random initialisation draws from the generator
    `initialize_distributed` seeded, before anything else does. The objective the config names
    attaches its hooks to the bare chunks before they are wrapped for data parallel.

    Args:
        cfg: The run's config.
        plan: What `preflight` returned for it.
        process_groups: Megatron's (`distributed.model_process_groups()`); None for one process.

    Returns:
        The `TrainState`, resumed from `plan.resume` when set.
    """
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    bf16 = cfg.model.bf16 if cfg.model.bf16 is not None else torch.cuda.is_available()
    chunks = _build_model(cfg, plan, bf16)
    if cfg.peft.lora:
        # The base weights first, then the adapters on them: the base loads as into a bare
        # model, and a resume restores only what training changes (adapters, router).
        if cfg.model.checkpoint:
            load_model_weights(chunks, cfg.model.checkpoint)
        apply_lora(chunks, lora_settings(cfg))
    model_config = chunks[0].config
    # megatron's process-wide aux-loss tracker is sized by the first model that logs to it: a
    # model of more layers built later in the process (tests, benchmarks) would index past it.
    forget_aux_losses()
    objectives = _build_objectives(cfg, plan, chunks, model_config, process_groups)
    chunks = _wrap_ddp(cfg, chunks, model_config)
    optimizer = _build_optimizer(cfg, chunks, bf16)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    scheduler = OptimizerParamScheduler(optimizer, **scheduler_settings(cfg, plan.train_steps))

    resume = plan.resume
    if resume is None and cfg.model.checkpoint and not cfg.peft.lora:
        load_model_weights([c.module for c in chunks], cfg.model.checkpoint)
        # The distributed / fp16 optimizer holds its own fp32 copies of the parameters.
        optimizer.reload_model_params()
    consumed = resume.consumed_samples if resume is not None else 0
    loader = _build_loader(cfg, plan, consumed, device,
                           anchor_rows=objective_class(cfg.sara.objective).needs_anchor_rows(cfg))
    record = {**data_stream(cfg, plan), "sara": sara_settings(cfg, plan)}
    if cfg.peft.lora:
        record["peft"] = peft_record(cfg)
    checkpointer = Checkpointer(cfg.checkpoint.save_dir, cfg.checkpoint.save_interval, record,
                                cfg.model.checkpoint, trainable_only=cfg.peft.lora,
                                write_files=_objective_files(objectives))
    state = TrainState(plan, device, chunks, model_config, optimizer, scheduler, loader,
                       iter(loader), checkpointer, objectives,
                       iteration=resume.iteration if resume is not None else 0,
                       consumed_samples=consumed, process_groups=process_groups)
    if resume is not None:
        check_optimizer_layout(resume.checkpoint_dir, resume.saved.get("trainer", {}), optimizer)
        load_training_checkpoint(resume.checkpoint_dir, chunks, optimizer, scheduler,
                                 trainable_only=cfg.peft.lora)
        for objective in objectives:
            objective.load_checkpoint_files(resume.checkpoint_dir)
    return state


def _objective_files(objectives):
    """What a save writes beside the weights for the objectives (ShifCon's shift), or None."""
    def write(folder: str) -> None:
        for objective in objectives:
            objective.write_checkpoint_files(folder)

    return write if objectives else None


def _build_model(cfg: TrainConfig, plan: RunPlan, bf16: bool) -> list:
    options = ModelOptions(
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
        recompute=cfg.model.recompute,
        token_dispatcher=cfg.model.token_dispatcher,
        use_te=cfg.model.use_te,
        seq_length=cfg.data.seq_length,
        calculate_per_token_loss=True,
    )
    vpp = cfg.parallel.vpp
    return [build_model(plan.arch, options, vp_stage=(i if vpp else None))
            for i in range(vpp or 1)]


def _build_objectives(cfg: TrainConfig, plan: RunPlan, chunks, model_config,
                      process_groups) -> list[Objective]:
    """The objective the config names, its hooks attached to the bare model chunks; none when it
    builds no term (SARA without priors: plain fine-tuning)."""
    cls = objective_class(cfg.sara.objective)
    if not cls.builds_term(cfg):
        return []
    return [cls.build(cfg, plan, chunks, model_config, process_groups)]


def _wrap_ddp(cfg: TrainConfig, chunks, model_config) -> list:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
        # Per-token loss: gradients are summed over data parallel and divided by the global
        # token count in finalize_model_grads, not averaged in the collective.
        average_in_collective=False,
    )
    wrapped = [DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=(i > 0))
               for i, chunk in enumerate(chunks)]
    model_config.no_sync_func = [c.no_sync for c in wrapped]
    if len(wrapped) == 1:
        model_config.no_sync_func = model_config.no_sync_func[0]
    model_config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _build_optimizer(cfg: TrainConfig, chunks, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=o.distributed_optimizer,
        ),
        chunks,
    )


def _build_loader(cfg: TrainConfig, plan: RunPlan, consumed_samples: int, device,
                  anchor_rows: bool):
    """This data-parallel rank's micro-batches from `consumed_samples` on: the token shards with
    their anchor priors, or random rows (data.mock)."""
    d = cfg.data
    if d.mock:
        from sara_megatron.data.mock_batches import MockSaraLoader

        return MockSaraLoader(
            vocab_size=plan.arch.vocab_size, num_experts=plan.arch.num_experts,
            prior_layers=plan.alignment_layers if plan.sara_term else (),
            seq_length=d.seq_length, micro_batch_size=d.micro_batch_size, dp_rank=plan.dp_rank,
            dp_size=plan.dp_size, consumed_samples=consumed_samples, seed=cfg.seed,
        )
    from sara_megatron.data.sara_dataset import SaraDataConfig
    from sara_megatron.priors.loader import build_sara_data_loader

    expected_fingerprint = None
    if d.prior_store and cfg.model.checkpoint:
        from sara_megatron.priors import prior_anchor_fingerprints, read_prior_store_metadata

        # Priors must come from the weights training starts from, or, when those were
        # themselves trained from a converted checkpoint, from that model (see
        # prior_anchor_fingerprints).
        expected_fingerprint = prior_anchor_fingerprints(
            cfg.model.checkpoint, read_prior_store_metadata(d.prior_store).model_fingerprint)
    data_config = SaraDataConfig(
        shards_dir=d.shards_dir,
        prior_store=d.prior_store,
        prior_layers=plan.alignment_layers if d.prior_store else None,
        languages=d.languages,
        seq_length=d.seq_length,
        micro_batch_size=d.micro_batch_size,
        epochs=plan.data_epochs,
        seed=cfg.seed,
        shuffle=d.shuffle,
        pad_id=d.pad_id,
        expected_model_fingerprint=expected_fingerprint,
        verify_shards=d.verify_shards,
        anchor_rows=anchor_rows,
        packing=d.packing,
    )
    loader = build_sara_data_loader(
        data_config, plan.dp_rank, plan.dp_size, consumed_samples=consumed_samples,
        num_workers=d.num_workers, pin_memory=device.type == "cuda", prior_device=device,
        global_batch_size=d.global_batch_size,
    )
    if d.packing and torch.distributed.get_rank() == 0:
        from sara_megatron.training.packed_step import log_fill_rate

        log_fill_rate(loader)
    return loader
