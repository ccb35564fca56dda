"""One training step's parts: fetching the global batch, the forward step megatron's pipeline
schedule runs on each micro-batch, the forward/backward itself, and the assembly of the step's
losses into a `StepRecord`.

Losses follow megatron's per-token convention (`calculate_per_token_loss`): the CE is summed over
response tokens and every gradient is divided once by the global batch's token count, so the
update does not depend on how the global batch is cut into micro-batches. The SARA term is
attached inside the aligned MoE layers (`SaraRoutingLoss`); λ_JS = 0 runs the very same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time

import torch
import torch.distributed as dist

from sara_megatron.compat.megatron_versions import (
    LOAD_BALANCING_LOSS,
    reduced_aux_loss_values,
    zero_aux_losses,
)
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.models.flops import training_flops_per_token
from sara_megatron.routing import observe_routers
from sara_megatron.tool_errors import UserFacingError
from sara_megatron.training.checkpoint import iteration_dir, latest_iteration
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.packed_step import model_inputs, next_step_micro_batches, sequences_in
from sara_megatron.training.state import TrainState

log = logging.getLogger(__name__)

# JS is >= 0; the reference sums of p·log(p/m) may land a few ulps below zero. Values above
# -JS_ROUNDOFF are logged as 0; anything lower means its inputs were not finite (the reference
# masks NaN probabilities to 0, which can leave a negative sum instead of a NaN).
JS_ROUNDOFF = 1e-5


class NonFiniteError(UserFacingError, RuntimeError):
    """A loss term or the gradient norm went non-finite (or JS negative): the run stops before
    it saves, so the last checkpoint stays the last good one."""


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
class GlobalBatch:
    """This rank's micro-batches of one step, with counts over the whole global batch."""

    microbatches: list
    loss_tokens: torch.Tensor  # response tokens
    sequences: torch.Tensor  # sequences with at least one non-padding token
    tokens: torch.Tensor  # non-padding tokens

    @property
    def seq_length(self) -> int:
        return self.microbatches[0].tokens.shape[1]


# --- the batch --------------------------------------------------------------------------------


def fetch_microbatches(state: TrainState, num_microbatches: int) -> list:
    """The step's micro-batches from the loader, on the device, with their priors. A packed
    step (data.packing) has the number its first micro-batch names."""
    try:
        return [mb.to(state.device).with_priors(state.loader.prior_table)
                for mb in next_step_micro_batches(state.batches, num_microbatches)]
    except StopIteration:
        raise RuntimeError(f"data ran out at step {state.iteration} (consumed "
                           f"{state.consumed_samples} samples)") from None


def prepare_batch(state: TrainState, cfg: TrainConfig, microbatches: list) -> GlobalBatch:
    """The global counts, and each objective's inputs for these micro-batches: online priors,
    ShifCon's anchor features (anchor forwards without gradient), SARA's and ShifCon's sequence
    weights, AES's calibration on the first step and token weight."""
    if cfg.sara.priors == "online":  # the anchor forward of this step (no gradient)
        from sara_megatron.sara.online_priors import online_anchor_priors

        priors = online_anchor_priors(state.chunks, microbatches, state.plan.alignment_layers,
                                      state.plan.arch.num_experts, state.device,
                                      process_groups=state.process_groups)
        microbatches = [dataclasses.replace(mb, priors=p) for mb, p in zip(microbatches, priors)]
    batch = GlobalBatch(microbatches, *_global_counts(microbatches, state.device))
    if state.sara is not None:
        state.sara.sequence_weight = float(batch.loss_tokens / batch.sequences.clamp_min(1))
        state.sara.reset_stats()
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    if state.shifcon is not None:  # the anchor forward of this step (no gradient, no shift)
        features = state.shifcon.anchor_features(state.chunks, microbatches, state.device)
        state.shifcon_anchors = {id(mb): f for mb, f in zip(microbatches, features)}
        from megatron.core import parallel_state as ps

        # mean over the contrasted sequences: anchor-language samples (data.languages: all)
        # are in the batch but not in the term
        contrasted = torch.tensor([float(state.shifcon.contrasted_in(microbatches))],
                                  dtype=torch.float64, device=state.device)
        dist.all_reduce(contrasted, group=ps.get_data_parallel_group())
        state.shifcon.sequence_weight = float(batch.loss_tokens / contrasted.clamp_min(1))
        state.shifcon.reset_stats()
    if state.aes is not None:
        _prepare_aes(state, cfg, batch, float(batch.loss_tokens / batch.tokens.clamp_min(1)))
    return batch


def _global_counts(microbatches, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss tokens, valid sequences, non-padding tokens) of the whole global batch, from the
    whole micro-batches (before any CP split: CP ranks share their samples)."""
    from megatron.core import parallel_state as ps

    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for mb in microbatches:
        counts[0] += mb.loss_mask.sum()
        counts[1] += sequences_in(mb)  # packed: the samples, not the rows
        counts[2] += (~mb.padding_mask).sum()
    dist.all_reduce(counts, group=ps.get_data_parallel_group())
    return counts[0], counts[1], counts[2]


def _prepare_aes(state: TrainState, cfg: TrainConfig, batch: GlobalBatch,
                 token_weight: float) -> None:
    """Calibrate AES's unset coefficients on this (the first) global batch with a forward pass
    that attaches nothing, then set the step's token weight (see sara.aes)."""
    aes = state.aes
    if not aes.calibrated:
        aes.reset_stats()
        with torch.no_grad(), observe_routers(state.chunks, aes):
            _run_schedule(state, cfg, batch, forward_only=True)
        ways = aes.calibrate(state.plan.arch.num_layers)
        if dist.get_rank() == 0:
            for way, v in ways.items():  # both candidates, whichever is used
                log.info("AES calibration %s%s: variance %.4g -> aes.variance_coeff=%g, "
                         "orthogonality %.4g -> aes.orthogonality_coeff=%g", way,
                         " (used)" if way == aes.calibration else "", v["variance"],
                         v["variance_coeff"], v["orthogonality"], v["orthogonality_coeff"])
            log.info("AES coefficients calibrated: aes.variance_coeff=%g "
                     "aes.orthogonality_coeff=%g (set them to resume exactly)",
                     aes.variance_coeff, aes.orthogonality_coeff)
    aes.reset_stats()
    aes.token_weight = token_weight


# --- forward and backward ---------------------------------------------------------------------


def forward_backward(state: TrainState, cfg: TrainConfig, batch: GlobalBatch) -> list:
    """Forward and backward over the global batch's micro-batches (megatron's pipeline schedule),
    with the SARA or AES observer on the routers; the per-micro-batch CE sums, last stage only."""
    # The step's LB is read back from megatron's process-wide tracker: start it empty, so a
    # forward outside the step (the anchor passes of online priors and ShifCon, AES
    # calibration, another model in the same process) cannot add to this step's value.
    zero_aux_losses()
    observer = state.sara if state.sara is not None else state.aes
    with (observe_routers(state.chunks, observer) if observer is not None
          else contextlib.nullcontext()):
        return _run_schedule(state, cfg, batch, forward_only=False)


def _run_schedule(state: TrainState, cfg: TrainConfig, batch: GlobalBatch, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(batch.microbatches) for _ in state.chunks]
    return get_forward_backward_func()(
        forward_step_func=functools.partial(forward_step, state),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=state.chunks if len(state.chunks) > 1 else state.chunks[0],
        num_microbatches=len(batch.microbatches),
        seq_length=batch.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        forward_only=forward_only,
    )


def forward_step(state: TrainState, data_iterator, model):
    """One micro-batch through one model chunk: (output, loss function), as megatron's schedules
    call it. The loss function sums the CE over response tokens (per-token convention)."""
    from megatron.core import parallel_state as ps

    mb = next(data_iterator)
    tokens, labels, loss_mask, padding_mask = mb.tokens, mb.labels, mb.loss_mask, mb.padding_mask
    cp_size = ps.get_context_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank() if cp_size > 1 else 0
    if cp_size > 1:
        # Each CP rank feeds its two chunks of every sequence; the routing sums, the CE and the
        # token counts are then summed over the CP group (capture, loss, finalize_grads).
        tokens, labels, loss_mask, padding_mask = (
            context_parallel_slice(t, cp_rank, cp_size)
            for t in (tokens, labels, loss_mask, padding_mask)
        )
    # Positions, attention mask and segment ids; per sample when the rows are packed.
    inputs = model_inputs(mb, padding_mask, cp_rank, cp_size)
    if state.sara is not None:
        state.sara.set_batch(mb.priors, inputs.segment_ids, packed=inputs.packed)
    if state.shifcon is not None:
        # (the step's pooled anchors over data parallel, where this rank's samples start)
        entry = state.shifcon_anchors.get(id(mb))
        anchors, offset = entry if entry is not None else (None, 0)
        state.shifcon.set_batch(mb.languages, padding_mask, anchors, offset,
                                segment_ids=inputs.segment_ids if inputs.packed else None)
    # The padding mask keeps padding out of megatron's load-balancing statistics and its token
    # count (and out of z-loss and expert-bias counts); nothing else reads it.
    with inputs.rope(model):
        output = model(tokens, inputs.positions, inputs.attention_mask, labels=labels,
                       padding_mask=_stage_padding_mask(state, model, padding_mask))

    def loss_func(per_token_loss):
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        num_tokens = loss_mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"ce": torch.stack([loss_sum.detach(), loss_mask.sum()])}

    return output, loss_func


def _stage_padding_mask(state: TrainState, model, padding_mask: torch.Tensor) -> torch.Tensor:
    """The [B, S] padding mask (True = padding) for this pipeline stage's model chunk.

    megatron's GPTModel cuts the mask for sequence parallel together with the embedding output,
    i.e. only on the stage that embeds (pre_process); a later stage receives hidden states
    already cut to its TP rank's S/TP positions and must be given that piece of the mask (the
    same contiguous piece `scatter_to_sequence_parallel_region` keeps)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    if not state.model_config.sequence_parallel or get_attr_wrapped_model(model, "pre_process"):
        return padding_mask
    tp = ps.get_tensor_model_parallel_world_size()
    piece = padding_mask.shape[1] // tp
    start = ps.get_tensor_model_parallel_rank() * piece
    return padding_mask[:, start:start + piece].contiguous()


# --- the step's losses ------------------------------------------------------------------------


def step_record(state: TrainState, cfg: TrainConfig, batch: GlobalBatch, reduced: list,
                lr: float, grad_norm, started: float) -> StepRecord:
    """The step's losses reduced over the ranks: CE, megatron's load-balancing loss, the SARA
    term per aligned layer, and the objective's own terms."""
    from megatron.core import parallel_state as ps

    arch = state.plan.arch
    # CE lives on the last pipeline stage: sum there, then over data × context parallel (CP
    # ranks hold parts of the same sequences) and stages.
    ce = torch.zeros(2, dtype=torch.float64, device=state.device)
    for item in reduced or []:
        ce += item["ce"].double()
    dist.all_reduce(ce, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(ce, group=ps.get_pipeline_model_parallel_group())

    values = reduced_aux_loss_values(LOAD_BALANCING_LOSS)
    lb = 0.0 if values is None else float(values.sum() / arch.num_layers / len(batch.microbatches))
    zero_aux_losses()

    terms = {}
    if state.shifcon is not None:
        terms = {"shifcon_contrastive": state.shifcon.reduced_mean()}
    if state.aes is not None:
        means = state.aes.reduced_layer_means()
        terms = {f"aes_{name}": sum(v.values()) / max(len(v), 1) for name, v in means.items()}
    js_layers = state.sara.reduced_layer_means(arch.num_layers) if state.sara else {}
    js_layers = {layer: 0.0 if -JS_ROUNDOFF < v < 0 else v for layer, v in js_layers.items()}
    elapsed = time.perf_counter() - started
    s = batch.seq_length
    return StepRecord(
        step=state.iteration,
        ce=float(ce[0] / ce[1].clamp_min(1)),
        lb=lb,
        js=sum(js_layers.values()) / len(js_layers) if js_layers else 0.0,
        js_per_layer=js_layers,
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        tokens_per_s=float(batch.tokens) / elapsed,
        step_time_s=elapsed,
        # rows computed over the ranks: the global batch unpacked, fewer packed
        tflops_per_gpu=training_flops_per_token(arch, s) * len(batch.microbatches)
        * cfg.data.micro_batch_size * state.plan.dp_size * s
        / elapsed / dist.get_world_size() / 1e12,
        terms=terms,
    )


def check_finite(record: StepRecord, cfg: TrainConfig) -> None:
    """Stop on a non-finite loss term or gradient norm, or a negative JS (see JS_ROUNDOFF),
    before the step's weights can be saved. Every rank sees the same reduced values."""
    terms = {"ce": record.ce, "lb": record.lb, "js": record.js, **record.terms,
             **{f"js of layer {layer}": v for layer, v in record.js_per_layer.items()}}
    if record.grad_norm is not None and not (cfg.optim.clip_grad == 0
                                              and math.isnan(record.grad_norm)):
        terms["grad_norm"] = record.grad_norm
    bad = {name: value for name, value in terms.items()
           if not math.isfinite(value) or (name.startswith("js") and value < 0)}
    if "js" in bad:  # the per-layer values say the same, at length
        bad = {k: v for k, v in bad.items() if not k.startswith("js of layer")}
    if not bad:
        return
    save_dir = cfg.checkpoint.save_dir
    saved = latest_iteration(save_dir) if save_dir else None
    kept = (f"the last checkpoint, {iteration_dir(save_dir, saved)}, is untouched"
            if saved is not None else "nothing was saved")
    negative_js = any(name.startswith("js") and math.isfinite(value) and value < 0
                      for name, value in bad.items())
    raise NonFiniteError(
        f"step {record.step}: non-finite {', '.join(f'{k}={v:.6g}' for k, v in bad.items())}"
        + (" (a JS divergence is never negative: its inputs were not finite)"
           if negative_js else "")
        + f"; training stopped before saving, {kept}. Lower optim.lr or check the data and "
        "the starting weights"
    )
