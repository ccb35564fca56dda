"""SARA fine-tuning on Megatron-Core: L = CE(response tokens) + λ_LB·LB + λ_JS·L_JS.

Built from megatron-core parts: `get_forward_backward_func` (pipeline schedules),
`DistributedDataParallel`, `get_megatron_optimizer` (Adam with decoupled weight decay, optionally
the distributed optimizer), `OptimizerParamScheduler` (linear warmup, cosine decay), gradient
clipping. Losses use megatron's per-token convention (`calculate_per_token_loss`): the CE is summed
over response tokens and every gradient is divided once by the global batch's token count, so the
update does not depend on how the global batch is cut into micro-batches. The SARA term is attached
inside the aligned MoE layers (`SaraRoutingLoss`); λ_JS = 0 runs the very same code (FFT baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import check_recorded_architecture, load_model_weights
from sara_megatron.distributed import ParallelConfig, initialize_distributed, set_seed
from sara_megatron.models.architecture import resolve_architecture
from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.models.flops import training_flops_per_token
from sara_megatron.models.longrope_padding import same_rope_regime
from sara_megatron.routing import observe_routers, segment_ids_from_padding_mask
from sara_megatron.sara import SaraRoutingLoss, select_alignment_layers
from sara_megatron.training.checkpoint import (
    LATEST_FILE,
    check_optimizer_layout,
    iteration_dir,
    latest_iteration,
    load_training_checkpoint,
    read_training_state,
    resume_iteration,
    save_training_checkpoint,
)
from sara_megatron.tool_errors import UserFacingError
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.metrics import MetricsWriter

log = logging.getLogger(__name__)


class NonFiniteError(UserFacingError, RuntimeError):
    """A loss term or the gradient norm went non-finite (or JS negative): the run stops before
    it saves, so the last checkpoint stays the last good one."""


# JS is >= 0; the reference sums of p·log(p/m) may land a few ulps below zero. Values above
# -JS_ROUNDOFF are logged as 0; anything lower means its inputs were not finite (the reference
# masks NaN probabilities to 0, which can leave a negative sum instead of a NaN).
JS_ROUNDOFF = 1e-5


@dataclasses.dataclass
class StepRecord:
    step: int
    ce: float
    lb: float
    js: float
    js_per_layer: dict
    lr: float
    grad_norm: float
    tokens_per_s: float  # non-padding tokens of the global batch per second
    step_time_s: float
    # Model matmul FLOPs of the step (every position, padding too: it is computed) per second
    # and GPU (rank); see sara_megatron.models.flops.
    tflops_per_gpu: float = float("nan")
    # The objective's own terms beyond ce / lb / js (AES: aes_variance, aes_orthogonality).
    terms: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainResult:
    steps: list  # StepRecord of every step run in this call
    final_iteration: int
    alignment_layers: list


class Trainer:
    """Sets up model, optimizer, schedule and data for a `TrainConfig`; `run()` trains."""

    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        p = cfg.parallel
        initialize_distributed(ParallelConfig(tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp, vpp=p.vpp), seed=cfg.seed)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.arch = resolve_architecture(cfg.model.preset)
        if cfg.model.num_layers is not None:
            if not 1 <= cfg.model.num_layers <= self.arch.num_layers:
                raise ValueError(f"model.num_layers must be in 1..{self.arch.num_layers}, got "
                                 f"{cfg.model.num_layers}")
            self.arch = dataclasses.replace(self.arch, num_layers=cfg.model.num_layers)
        if cfg.model.checkpoint:
            if os.path.exists(os.path.join(cfg.model.checkpoint, LATEST_FILE)):
                raise ValueError(
                    f"model.checkpoint {cfg.model.checkpoint} is a training run's folder: name "
                    f"one of its iteration folders (e.g. "
                    f"{iteration_dir(cfg.model.checkpoint, latest_iteration(cfg.model.checkpoint))})"
                    ", or make it the run's checkpoint.save_dir to resume that run"
                )
            # Before anything is built; a resume checks its own checkpoint's record below.
            check_recorded_architecture(self.arch, cfg.model.checkpoint)
        bf16 = cfg.model.bf16 if cfg.model.bf16 is not None else torch.cuda.is_available()
        self.bf16 = bf16
        options = ModelOptions(
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            bf16=bf16,
            moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
            recompute=cfg.model.recompute,
            token_dispatcher=cfg.model.token_dispatcher,
            seq_length=cfg.data.seq_length,
            calculate_per_token_loss=True,
        )
        vpp = p.vpp or 1
        chunks = [build_model(self.arch, options, vp_stage=(i if p.vpp else None)) for i in range(vpp)]
        self.model_config = chunks[0].config

        self.alignment_layers = select_alignment_layers(
            self.arch.num_layers, cfg.sara.layers, family=self.arch.family,
            first=cfg.sara.first_layer, last=cfg.sara.last_layer, seed=cfg.sara.layer_seed,
        )
        self.sara: Optional[SaraRoutingLoss] = None
        if cfg.data.prior_store or cfg.data.mock or cfg.sara.priors == "online":
            self.sara = SaraRoutingLoss(
                self.alignment_layers, cfg.sara.lambda_js,
                sequence_parallel=self.model_config.sequence_parallel, impl=cfg.sara.impl,
                divergence=cfg.sara.divergence,
            )
        elif cfg.sara.lambda_js > 0 and cfg.sara.objective == "sara":
            raise ValueError("sara.lambda_js > 0 needs data.prior_store (the anchor priors), or "
                             "data.mock")

        self.aes = None
        if cfg.sara.objective == "aes":  # the AES baseline: no SARA term (docs/objectives.md)
            from sara_megatron.sara.aes import AesLoss

            a = cfg.aes
            self.sara = None
            self.aes = AesLoss(a.variance_coeff, a.orthogonality_coeff, a.variance_target,
                               a.orthogonality_target)
            self.aes.attach(chunks)
        self.shifcon = None
        if cfg.sara.objective == "shifcon":  # the ShifCon baseline (docs/objectives.md)
            self.sara = None
            self.shifcon = self._build_shifcon(chunks)

        self._build_optimizer(chunks)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        d = cfg.data
        per_step = d.micro_batch_size * self.dp_size
        if d.global_batch_size % per_step:
            raise ValueError(
                f"global batch {d.global_batch_size} is not a multiple of micro batch × data "
                f"parallel = {d.micro_batch_size} × {self.dp_size}"
            )
        self.num_microbatches = d.global_batch_size // per_step

        self.iteration = 0
        self.consumed_samples = 0
        if not cfg.checkpoint.save_dir and dist.get_rank() == 0:
            log.warning("checkpoint.save_dir is not set: nothing of this run will be saved "
                        "(the trained weights are lost when it ends)")
        # Collective: the latest checkpoint whose files match its manifest (see resume_iteration).
        resume = cfg.checkpoint.resume and resume_iteration(cfg.checkpoint.save_dir,
                                                            cfg.checkpoint.strict_resume)
        saved = None
        if resume:
            # The data position first (a small read), so that the data and the schedule are set
            # up and checked against the checkpoint before its tensors are loaded.
            resume_dir = iteration_dir(cfg.checkpoint.save_dir, resume)
            check_recorded_architecture(self.arch, resume_dir)
            saved = read_training_state(resume_dir)
            self.iteration = int(saved["trainer"]["iteration"])
            self.consumed_samples = int(saved["trainer"]["consumed_samples"])
        elif cfg.model.checkpoint:
            load_model_weights([c.module for c in self.chunks], cfg.model.checkpoint)
            # The distributed / fp16 optimizer holds its own fp32 copies of the parameters.
            self.optimizer.reload_model_params()
        self._build_data()
        if resume:
            self._check_resume(resume_dir, saved)
            load_training_checkpoint(resume_dir, self.chunks, self.optimizer, self.scheduler)

    # --- setup -------------------------------------------------------------------------------

    def _build_optimizer(self, chunks) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optim
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=o.distributed_optimizer,
            # Per-token loss: gradients are summed over data parallel and divided by the global
            # token count in finalize_model_grads, not averaged in the collective.
            average_in_collective=False,
        )
        self.chunks = [
            DistributedDataParallel(self.model_config, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        cfg = self.model_config
        cfg.no_sync_func = [c.no_sync for c in self.chunks]
        if len(self.chunks) == 1:
            cfg.no_sync_func = cfg.no_sync_func[0]
        cfg.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                clip_grad=o.clip_grad, bf16=self.bf16,
                params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                use_distributed_optimizer=o.distributed_optimizer,
            ),
            self.chunks,
        )
        # The schedule's length depends on the data; set in _build_data before the first step.
        # Its settings always come from the config: a resumed run whose settings differ from the
        # checkpoint's is refused before loading, unless optim.override_scheduler says the config
        # wins (`_check_resume`), so loading restores only the step count. (megatron's default,
        # use_checkpoint_opt_param_scheduler, would silently keep the checkpoint's lr, min_lr
        # and weight decay.)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=0,
            lr_decay_steps=1, lr_decay_style="cosine", start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )

    def _build_mock_data(self) -> None:
        from sara_megatron.data.mock_batches import MockSaraLoader

        d = self.cfg.data
        if not self.cfg.optim.train_steps or not d.seq_length:
            raise ValueError("data.mock needs optim.train_steps and data.seq_length")
        self.loader = MockSaraLoader(
            vocab_size=self.arch.vocab_size, num_experts=self.arch.num_experts,
            prior_layers=self.alignment_layers if self.sara is not None else (),
            seq_length=d.seq_length, micro_batch_size=d.micro_batch_size, dp_rank=self.dp_rank,
            dp_size=self.dp_size, consumed_samples=self.consumed_samples, seed=self.cfg.seed,
        )
        self._check_sequence_split(d.seq_length)
        self._set_schedule_length(self.cfg.optim.train_steps)

    def _set_schedule_length(self, steps: int) -> None:
        self.train_steps = steps
        self.scheduler.lr_warmup_steps = int(self.cfg.optim.warmup_fraction * steps)
        self.scheduler.lr_decay_steps = steps
        self.scheduler.wd_incr_steps = steps
        self.scheduler.step(0)  # applies the lr of the current step to the optimizer
        self.batches = iter(self.loader)

    def _build_data(self) -> None:
        from sara_megatron.data.sara_dataset import SaraDataConfig
        from sara_megatron.priors.loader import build_sara_data_loader

        d = self.cfg.data
        if d.mock:
            return self._build_mock_data()
        expected_fingerprint = None
        if d.prior_store and self.cfg.model.checkpoint:
            from sara_megatron.priors import prior_anchor_fingerprints, read_prior_store_metadata

            # Priors must come from the weights training starts from, or, when those were
            # themselves trained from a converted checkpoint, from that model (see
            # prior_anchor_fingerprints).
            expected_fingerprint = prior_anchor_fingerprints(
                self.cfg.model.checkpoint,
                read_prior_store_metadata(d.prior_store).model_fingerprint,
            )
        self.data_config = SaraDataConfig(
            shards_dir=d.shards_dir,
            prior_store=d.prior_store,
            prior_layers=self.alignment_layers if d.prior_store else None,
            languages=d.languages,
            seq_length=d.seq_length,
            micro_batch_size=d.micro_batch_size,
            epochs=max(1, math.ceil(d.epochs)),
            seed=self.cfg.seed,
            shuffle=d.shuffle,
            pad_id=d.pad_id,
            expected_model_fingerprint=expected_fingerprint,
            verify_shards=d.verify_shards,
            anchor_rows=self.cfg.sara.priors == "online" or self.shifcon is not None,
        )
        def loader():
            return build_sara_data_loader(
                self.data_config, self.dp_rank, self.dp_size, consumed_samples=self.consumed_samples,
                num_workers=d.num_workers, pin_memory=self.device.type == "cuda",
                prior_device=self.device,
            )

        self.loader = loader()
        if self.shifcon is not None:
            self._check_shifcon_languages()
        self._check_truncation()
        self._check_rope_regime()
        self._check_sequence_split(self.loader.collate_fn.seq_length)
        samples_per_epoch = len(self.loader.dataset)
        steps = self.cfg.optim.train_steps or int(d.epochs * samples_per_epoch // d.global_batch_size)
        if steps < 1:
            raise ValueError(
                f"{d.epochs} epoch(s) of {samples_per_epoch} samples make no step of global "
                f"batch {d.global_batch_size}"
            )
        # An explicit step count may need more passes over the data than `epochs` says.
        epochs_needed = math.ceil(steps * d.global_batch_size / samples_per_epoch)
        if epochs_needed > self.data_config.epochs:
            self.data_config = dataclasses.replace(self.data_config, epochs=epochs_needed)
            self.loader = loader()
        self._set_schedule_length(steps)

    def _check_truncation(self) -> None:
        """Refuse a data.seq_length that cuts training samples when SARA reads anchor priors.

        The batches cut every sample at data.seq_length, while the priors were extracted on
        whole anchor sequences: JS would compare the routing profile of a sample's first
        data.seq_length tokens with that of its whole anchor. Without that term a cut only
        shortens what the loss sees, which may be meant: a warning then."""
        d = self.cfg.data
        if not d.seq_length:
            return  # the shards' own length: nothing is cut
        dataset = self.loader.dataset
        lengths = [sample.meta.token_count for sample in dataset.samples]
        cut = sum(n > d.seq_length for n in lengths)
        if not cut:
            return
        what = (f"data.seq_length={d.seq_length} cuts {cut} of {len(lengths)} training samples "
                f"(the longest has {max(lengths)} tokens; the shards were written for "
                f"{dataset.shards.seq_length})")
        if d.prior_store and self.cfg.sara.lambda_js > 0:
            raise ValueError(
                f"{what}, but the anchor priors in {d.prior_store} were extracted on whole "
                f"sequences: SARA would align the routing of cut samples with that of whole "
                f"anchors. Set data.seq_length to {max(lengths)} or more (or leave it unset: the "
                f"shards' length), or run without SARA (sara.lambda_js=0)"
            )
        log.warning("%s: those samples are trained on their first %d tokens only", what, d.seq_length)

    def _check_rope_regime(self) -> None:
        """Refuse a data.seq_length on the other side of the longrope switch from the shards'
        when SARA reads anchor priors: batches are padded to data.seq_length, so every position
        would get the other rope factors than the priors were extracted with (extraction pads
        by the shards' length, see models.longrope_padding)."""
        d = self.cfg.data
        if not (d.seq_length and d.prior_store and self.cfg.sara.lambda_js > 0):
            return
        switch = self.arch.longrope.original_max_position_embeddings if self.arch.longrope else None
        shards_length = self.loader.dataset.shards.seq_length
        if not same_rope_regime(d.seq_length, shards_length, switch):
            raise ValueError(
                f"data.seq_length={d.seq_length} and the shards' seq_length {shards_length} lie on "
                f"either side of the longrope switch at {switch} positions: training would use "
                f"other rope factors than the anchor priors in {d.prior_store} were extracted "
                f"with. Leave data.seq_length unset (the shards' length), or shard with a "
                f"seq_length on the same side of the switch"
            )

    def _data_stream(self) -> dict:
        """The settings that decide which sample sits at each position of the global sample
        order, which consumed_samples counts: saved with every checkpoint, checked on resume."""
        d = self.cfg.data
        # Not the global batch: it sets how many positions a step takes, not which sample sits
        # at each (sample_order.GlobalSampleOrder), so a resume may change it.
        stream = {"seed": self.cfg.seed, "mock": bool(d.mock)}
        if not d.mock:
            stream.update(shuffle=bool(d.shuffle), languages=list(self.loader.dataset.languages),
                          samples=len(self.loader.dataset))
        return stream

    def _sara_settings(self) -> dict:
        """What the SARA term is: saved with every checkpoint; a resume that changes it warns.
        The objective, divergence and prior source are recorded when not the paper's (so that
        checkpoints of plain SARA runs keep their record)."""
        settings = {"lambda_js": self.cfg.sara.lambda_js if self.sara is not None else 0.0,
                    "alignment_layers": list(self.alignment_layers) if self.sara is not None else []}
        for key, paper in (("objective", "sara"), ("divergence", "js"), ("priors", "store")):
            if getattr(self.cfg.sara, key) != paper:
                settings[key] = getattr(self.cfg.sara, key)
        return settings

    # Config setting behind each saved value, for the messages of `_check_resume`.
    _DATA_STREAM_SETTINGS = {
        "seed": "seed", "mock": "data.mock",
        "shuffle": "data.shuffle", "languages": "data.languages (resolved)",
        "samples": "training samples (data.shards_dir, data.languages)",
    }
    _SCHEDULE_SETTINGS = {
        "max_lr": "optim.lr", "min_lr": "optim.min_lr",
        "lr_warmup_steps": "warmup steps (optim.warmup_fraction × schedule length)",
        "lr_decay_steps": "schedule length in steps (optim.train_steps, or data.epochs × "
                          "samples / data.global_batch_size)",
        "lr_decay_style": "lr decay style", "wd_incr_style": "weight decay style",
        "start_wd": "optim.weight_decay",
        # Set from the same settings as the entries above; named once in a message.
        "wd_incr_steps": None, "end_wd": None,
    }

    def _check_resume(self, checkpoint_dir: str, saved: dict) -> None:
        """Refuse to resume where the checkpoint's data stream or LR schedule differ from the
        config (before any tensor is loaded).

        consumed_samples is a position in a seeded permutation of the training samples: with
        another seed, shuffle, language set or sample count it would point into a different
        order, repeating some samples and skipping others (another global batch only takes more
        or fewer positions per step). A changed schedule would
        silently take effect mid-run; optim.override_scheduler=true makes the config's win."""
        position = saved.get("trainer", {})
        check_optimizer_layout(checkpoint_dir, position, self.optimizer)
        stream = self._data_stream()
        unrecorded = sorted(k for k in stream if k not in position)
        if unrecorded:
            log.warning("%s does not record %s (an older checkpoint): not checked on resume",
                        checkpoint_dir, ", ".join(unrecorded))
        changed = [f"{self._DATA_STREAM_SETTINGS[k]}: checkpoint {position[k]!r}, config {v!r}"
                   for k, v in stream.items() if k in position and position[k] != v]
        if changed:
            raise ValueError(
                f"cannot resume from {checkpoint_dir}: the data stream differs from the "
                f"checkpoint's ({'; '.join(changed)}). Its consumed_samples "
                f"({position['consumed_samples']}) counts positions in the sample order those "
                "settings define; another order would repeat some samples and skip others. "
                "Restore the checkpoint's values, or train into another checkpoint.save_dir"
            )

        saved_sara, own_sara = position.get("sara"), self._sara_settings()
        if saved_sara is not None and saved_sara != own_sara:
            # A deliberate change (a λ_JS schedule, FFT after SARA) is allowed, never silent.
            extra = {k: (saved_sara.get(k), own_sara.get(k)) for k in ("objective", "divergence", "priors")
                     if saved_sara.get(k) != own_sara.get(k)}  # None: the paper's
            log.warning("resuming from %s with another SARA term: checkpoint λ_JS %s on layers %s, "
                        "config λ_JS %s on layers %s%s", checkpoint_dir, saved_sara["lambda_js"],
                        saved_sara["alignment_layers"], own_sara["lambda_js"],
                        own_sara["alignment_layers"],
                        "".join(f"; sara.{k}: checkpoint {a or 'paper'}, config {b or 'paper'}"
                                for k, (a, b) in extra.items()))

        saved_schedule = saved.get("scheduler", {})
        changed = [f"{self._SCHEDULE_SETTINGS.get(k, k)}: checkpoint {saved_schedule[k]!r}, "
                   f"config {v!r}" for k, v in self.scheduler.state_dict().items()
                   if k != "num_steps" and k in saved_schedule and saved_schedule[k] != v
                   and self._SCHEDULE_SETTINGS.get(k, k) is not None]
        # Adam's settings ride in the saved optimizer param groups, beside the schedule's.
        saved_adam = _adam_settings(saved.get("param_groups", []))
        own_adam = _adam_settings(self.optimizer.param_groups)
        if saved_adam and saved_adam != own_adam:
            changed.append(f"optim.adam_beta1, adam_beta2, adam_eps: checkpoint "
                           f"{', '.join(map(str, saved_adam))}, config {', '.join(map(str, own_adam))}")
        if not changed:
            return
        if not self.cfg.optim.override_scheduler:
            raise ValueError(
                f"cannot resume from {checkpoint_dir}: the learning-rate schedule or Adam "
                f"settings differ from the checkpoint's ({'; '.join(changed)}). Restore the "
                "checkpoint's values, or "
                "set optim.override_scheduler=true to continue from step "
                f"{self.iteration} on the config's schedule"
            )
        log.warning("resuming from %s on the config's schedule (optim.override_scheduler): %s",
                    checkpoint_dir, "; ".join(changed))

    def _check_sequence_split(self, seq_length: int) -> None:
        """Every batch is padded to `seq_length`: CP cuts it in 2·cp chunks, then sequence
        parallel cuts a CP rank's part in TP pieces. Refuse at start what would fail mid-step."""
        from megatron.core import parallel_state as ps

        cp = ps.get_context_parallel_world_size()
        tp = ps.get_tensor_model_parallel_world_size() if self.model_config.sequence_parallel else 1
        cp_chunks = 2 * cp if cp > 1 else 1
        if seq_length % cp_chunks or (seq_length // cp) % tp:
            raise ValueError(
                f"sequence length {seq_length} does not split over context parallel {cp} "
                f"({cp_chunks} equal chunks) and then sequence parallel {tp} (a CP rank's "
                f"{seq_length // cp} tokens in equal parts): change data.seq_length"
            )

    # --- one step ----------------------------------------------------------------------------

    def _next_microbatches(self) -> list:
        try:
            return [
                next(self.batches).to(self.device).with_priors(self.loader.prior_table)
                for _ in range(self.num_microbatches)
            ]
        except StopIteration:
            raise RuntimeError(
                f"data ran out at step {self.iteration} (consumed {self.consumed_samples} samples)"
            ) from None

    def _global_counts(self, microbatches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss tokens, valid sequences, non-padding tokens) of the whole global batch, from
        the whole micro-batches (before any CP split: CP ranks share their samples)."""
        from megatron.core import parallel_state as ps

        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        for mb in microbatches:
            counts[0] += mb.loss_mask.sum()
            counts[1] += (~mb.padding_mask).any(dim=1).sum()
            counts[2] += (~mb.padding_mask).sum()
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        return counts[0], counts[1], counts[2]

    def _forward_step(self, data_iterator, model):
        from megatron.core import parallel_state as ps

        mb = next(data_iterator)
        b, s = mb.tokens.shape
        positions = torch.arange(s, device=self.device).expand(b, s)
        tokens, labels, loss_mask, padding_mask = mb.tokens, mb.labels, mb.loss_mask, mb.padding_mask
        cp_size = ps.get_context_parallel_world_size()
        if cp_size > 1:
            # Each CP rank feeds its two chunks of every sequence; the routing sums, the CE and
            # the token counts are then summed over the CP group (capture, loss, finalize_grads).
            cp_rank = ps.get_context_parallel_rank()
            tokens, labels, loss_mask, padding_mask, positions = (
                context_parallel_slice(t, cp_rank, cp_size)
                for t in (tokens, labels, loss_mask, padding_mask, positions)
            )
        if self.sara is not None:
            self.sara.set_batch(mb.priors, segment_ids_from_padding_mask(padding_mask))
        if self.shifcon is not None:
            anchors = self._shifcon_anchors.get(id(mb))
            self.shifcon.set_batch(mb.languages, padding_mask, anchors,
                                   ps.get_data_parallel_rank() * b)
        local_s = tokens.shape[1]
        # The padding mask keeps padding out of megatron's load-balancing statistics and its
        # token count (and out of z-loss and expert-bias counts); nothing else reads it.
        output = model(tokens, positions, causal_attention_mask(local_s, self.device), labels=labels,
                       padding_mask=self._stage_padding_mask(model, padding_mask))

        def loss_func(per_token_loss):
            loss_sum = (per_token_loss.float() * loss_mask).sum()
            num_tokens = loss_mask.sum().to(torch.int)
            return loss_sum, num_tokens, {"ce": torch.stack([loss_sum.detach(), loss_mask.sum()])}

        return output, loss_func

    def _stage_padding_mask(self, model, padding_mask: torch.Tensor) -> torch.Tensor:
        """The [B, S] padding mask (True = padding) for this pipeline stage's model chunk.

        megatron's GPTModel cuts the mask for sequence parallel together with the embedding
        output, i.e. only on the stage that embeds (pre_process); a later stage receives hidden
        states already cut to its TP rank's S/TP positions and must be given that piece of the
        mask (the same contiguous piece `scatter_to_sequence_parallel_region` keeps)."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_attr_wrapped_model

        if not self.model_config.sequence_parallel or get_attr_wrapped_model(model, "pre_process"):
            return padding_mask
        tp = ps.get_tensor_model_parallel_world_size()
        piece = padding_mask.shape[1] // tp
        start = ps.get_tensor_model_parallel_rank() * piece
        return padding_mask[:, start:start + piece].contiguous()

    def train_step(self) -> StepRecord:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        started = time.perf_counter()
        # RNG from (seed, step): a resumed run draws what an uninterrupted one would.
        set_seed(self.cfg.seed + self.iteration)
        microbatches = self._next_microbatches()
        if self.cfg.sara.priors == "online":  # the anchor forward of this step (no gradient)
            from sara_megatron.sara.online_priors import online_anchor_priors

            priors = online_anchor_priors(self.chunks, microbatches, self.alignment_layers,
                                          self.arch.num_experts, self.device)
            microbatches = [dataclasses.replace(mb, priors=p) for mb, p in zip(microbatches, priors)]
        loss_tokens, sequences, tokens = self._global_counts(microbatches)
        if self.sara is not None:
            self.sara.sequence_weight = float(loss_tokens / sequences.clamp_min(1))
            self.sara.reset_stats()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        s = microbatches[0].tokens.shape[1]
        iterators = [iter(microbatches) for _ in self.chunks]
        if self.shifcon is not None:  # the anchor forward of this step (no gradient, no shift)
            features = self.shifcon.anchor_features(self.chunks, microbatches, self.device)
            self._shifcon_anchors = {id(mb): f for mb, f in zip(microbatches, features)}
            self.shifcon.sequence_weight = float(loss_tokens / sequences.clamp_min(1))
            self.shifcon.reset_stats()
        if self.aes is not None:
            self._prepare_aes(microbatches, float(loss_tokens / tokens.clamp_min(1)))
        # The step's LB is read back from megatron's process-wide tracker: start it empty, so a
        # forward outside the step (the anchor passes of online priors and ShifCon, AES
        # calibration, another model in the same process) cannot add to this step's value.
        clear_aux_losses_tracker()
        observer = self.sara if self.sara is not None else self.aes
        with observe_routers(observer) if observer is not None else contextlib.nullcontext():
            reduced = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=self.num_microbatches,
                seq_length=s,
                micro_batch_size=self.cfg.data.micro_batch_size,
                forward_only=False,
            )
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {self.iteration} failed (non-finite gradients?)")
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += self.cfg.data.global_batch_size

        # CE lives on the last pipeline stage: sum there, then over data × context parallel
        # (CP ranks hold parts of the same sequences) and stages.
        ce = torch.zeros(2, dtype=torch.float64, device=self.device)
        for item in reduced or []:
            ce += item["ce"].double()
        dist.all_reduce(ce, group=ps.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(ce, group=ps.get_pipeline_model_parallel_group())

        tracker = get_moe_layer_wise_logging_tracker()
        lb = 0.0
        if "load_balancing_loss" in tracker:
            reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
            values = tracker["load_balancing_loss"]["values"]
            lb = float(values.sum() / self.arch.num_layers / self.num_microbatches)
        clear_aux_losses_tracker()

        terms = {}
        if self.shifcon is not None:
            terms = {"shifcon_contrastive": self.shifcon.reduced_mean()}
        if self.aes is not None:
            means = self.aes.reduced_layer_means()
            terms = {f"aes_{name}": sum(v.values()) / max(len(v), 1) for name, v in means.items()}
        js_layers = self.sara.reduced_layer_means(self.arch.num_layers) if self.sara else {}
        js_layers = {layer: 0.0 if -JS_ROUNDOFF < v < 0 else v for layer, v in js_layers.items()}
        elapsed = time.perf_counter() - started
        return StepRecord(
            step=self.iteration,
            ce=float(ce[0] / ce[1].clamp_min(1)),
            lb=lb,
            js=sum(js_layers.values()) / len(js_layers) if js_layers else 0.0,
            js_per_layer=js_layers,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=float(tokens) / elapsed,
            step_time_s=elapsed,
            tflops_per_gpu=training_flops_per_token(self.arch, s) * self.cfg.data.global_batch_size
            * s / elapsed / dist.get_world_size() / 1e12,
            terms=terms,
        )

    def _build_shifcon(self, chunks):
        from sara_megatron.sara.shifcon import ShifconObjective, load_language_vectors

        s = self.cfg.shifcon
        if s.shift_back_layer >= self.arch.num_layers:
            raise ValueError(f"shifcon.shift_back_layer {s.shift_back_layer} is past the model's "
                             f"{self.arch.num_layers} layers")
        vectors = load_language_vectors(s.language_vectors)
        if self.cfg.model.checkpoint:
            from sara_megatron.priors import prior_anchor_fingerprints

            accepted = prior_anchor_fingerprints(self.cfg.model.checkpoint, vectors.model_fingerprint)
            if vectors.model_fingerprint not in accepted:
                raise ValueError(f"language vectors {s.language_vectors} come from another model "
                                 f"({vectors.model_fingerprint}) than model.checkpoint "
                                 f"{self.cfg.model.checkpoint}")
        objective = ShifconObjective(vectors, s.shift_layer, s.shift_back_layer,
                                     s.contrastive_coeff, s.temperature)
        objective.attach(chunks)
        self._shifcon_anchors = {}
        return objective

    def _check_shifcon_languages(self) -> None:
        """The vectors must be keyed by these shards' anchor and cover every training language."""
        shards = self.loader.dataset.shards
        vectors = self.shifcon.vectors
        if vectors.anchor_language != shards.anchor_language:
            raise ValueError(f"language vectors {self.cfg.shifcon.language_vectors} are "
                             f"{vectors.anchor_language!r}-anchored, the shards anchor on "
                             f"{shards.anchor_language!r}")
        missing = [lang for lang in self.loader.dataset.languages if lang not in vectors.vectors]
        if missing:
            raise ValueError(f"language vectors {self.cfg.shifcon.language_vectors} have no "
                             f"vector for {missing}")

    def _prepare_aes(self, microbatches, token_weight: float) -> None:
        """Calibrate AES's unset coefficients on this (the first) global batch with a forward
        pass that attaches nothing, then set the step's token weight (see sara.aes)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not self.aes.calibrated:
            self.aes.reset_stats()
            iterators = [iter(microbatches) for _ in self.chunks]
            with torch.no_grad(), observe_routers(self.aes):
                get_forward_backward_func()(
                    forward_step_func=self._forward_step,
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                    num_microbatches=self.num_microbatches, seq_length=microbatches[0].tokens.shape[1],
                    micro_batch_size=self.cfg.data.micro_batch_size, forward_only=True,
                )
            self.aes.calibrate_from(self.aes.reduced_layer_means())
            if dist.get_rank() == 0:
                log.info("AES coefficients calibrated: aes.variance_coeff=%g "
                         "aes.orthogonality_coeff=%g (set them to resume exactly)",
                         self.aes.variance_coeff, self.aes.orthogonality_coeff)
        self.aes.reset_stats()
        self.aes.token_weight = token_weight

    def check_finite(self, record: StepRecord) -> None:
        """Stop on a non-finite loss term or gradient norm, or a negative JS (see JS_ROUNDOFF),
        before the step's weights can be saved. Every rank sees the same reduced values."""
        terms = {"ce": record.ce, "lb": record.lb, "js": record.js, **record.terms,
                 **{f"js of layer {layer}": v for layer, v in record.js_per_layer.items()}}
        if record.grad_norm is not None and not (self.cfg.optim.clip_grad == 0
                                                  and math.isnan(record.grad_norm)):
            terms["grad_norm"] = record.grad_norm
        bad = {name: value for name, value in terms.items()
               if not math.isfinite(value) or (name.startswith("js") and value < 0)}
        if "js" in bad:  # the per-layer values say the same, at length
            bad = {k: v for k, v in bad.items() if not k.startswith("js of layer")}
        if not bad:
            return
        saved = latest_iteration(self.cfg.checkpoint.save_dir) if self.cfg.checkpoint.save_dir else None
        kept = (f"the last checkpoint, {iteration_dir(self.cfg.checkpoint.save_dir, saved)}, is "
                "untouched" if saved is not None else "nothing was saved")
        negative_js = any(name.startswith("js") and math.isfinite(value) and value < 0
                          for name, value in bad.items())
        raise NonFiniteError(
            f"step {record.step}: non-finite {', '.join(f'{k}={v:.6g}' for k, v in bad.items())}"
            + (" (a JS divergence is never negative: its inputs were not finite)"
               if negative_js else "")
            + f"; training stopped before saving, {kept}. Lower optim.lr or check the data and "
            "the starting weights"
        )

    # --- loop --------------------------------------------------------------------------------

    def save(self) -> None:
        save_training_checkpoint(
            self.cfg.checkpoint.save_dir, self.iteration, self.chunks, self.optimizer,
            self.scheduler, dict(consumed_samples=self.consumed_samples, **self._data_stream(),
                                 sara=self._sara_settings()),
            conversion_source=self.cfg.model.checkpoint,
        )

    def run(self, max_steps: Optional[int] = None) -> TrainResult:
        """Train to the end of the schedule (or `max_steps` more steps); save as configured."""
        c, lg = self.cfg.checkpoint, self.cfg.logging
        writer = None
        if dist.get_rank() == 0:
            writer = MetricsWriter(self.train_steps, lg.tensorboard_dir, lg.wandb_project, lg.json_log,
                                   self.cfg.to_dict(), start_step=self.iteration)
        records = []
        end = self.train_steps if max_steps is None else min(self.train_steps, self.iteration + max_steps)
        try:
            while self.iteration < end:
                record = self.train_step()
                records.append(record)
                if writer and (self.iteration % lg.log_interval == 0 or self.iteration == end):
                    writer.write(record.step, dict(
                        ce=record.ce, lb=record.lb, js=record.js, lr=record.lr,
                        grad_norm=record.grad_norm, tokens_per_s=record.tokens_per_s,
                        step_time_s=record.step_time_s, tflops_per_gpu=record.tflops_per_gpu,
                        **record.terms,
                    ), record.js_per_layer)
                self.check_finite(record)
                if c.save_dir and c.save_interval and self.iteration % c.save_interval == 0:
                    self.save()
            if c.save_dir and (not c.save_interval or self.iteration % c.save_interval):
                self.save()
        finally:
            if writer:
                writer.close()
        return TrainResult(records, self.iteration, self.alignment_layers)


def _adam_settings(param_groups) -> list[tuple]:
    """The distinct (beta1, beta2, eps) of optimizer param groups (live or as saved)."""
    return sorted({(*g["betas"], g["eps"]) for g in param_groups if "betas" in g and "eps" in g})


def train(cfg: TrainConfig, max_steps: Optional[int] = None) -> TrainResult:
    return Trainer(cfg).run(max_steps)
