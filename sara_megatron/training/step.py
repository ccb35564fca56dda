"""One training step's parts: fetching the global batch, the forward step megatron's pipeline
schedule runs on each micro-batch, the forward/backward itself, and the assembly of the step's
losses into a `StepRecord`.

Losses follow megatron's per-token convention (`calculate_per_token_loss`): the CE is summed over
response tokens and every gradient is divided once by the global batch's token count, so the
update does not depend on how the global batch is cut into micro-batches. The objectives' terms
(training.objectives) are attached inside the model by their own hooks and router observers; the
step calls each objective at the same points and knows none by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from sara_megatron.training.objectives import StepContext
from sara_megatron.training.objectives.sara import JS_ROUNDOFF
from sara_megatron.training.packed_step import model_inputs, next_step_micro_batches, sequences_in
from sara_megatron.training.state import TrainState


class NonFiniteError(UserFacingError, RuntimeError):
    """A loss term or the gradient norm went non-finite (or JS negative): the run stops before
    it saves, so the last checkpoint stays the last good one."""


@dataclasses.dataclass
class StepRecord:
    """One step's values, reduced over the ranks (every rank holds the same).

    Attributes:
        step: The global step.
        ce: Mean cross-entropy per response token of the global batch.
        lb: megatron's load-balancing loss, mean over layers and micro-batches.
        js: SARA's routing JS term (0 without one).
        js_per_layer: aligned layer -> its JS.
        lr: The learning rate the step used.
        grad_norm: The gradient norm (NaN when the optimizer gave none).
        tokens_per_s: Non-padding tokens of the global batch per second.
        step_time_s: The step's wall time, in seconds.
        tflops_per_gpu: Model matmul TFLOP/s per GPU (rank), padding included.
        terms: The objectives' own terms beyond ce / lb / js, by their metric names.
    """
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
    # The objectives' own terms beyond ce / lb / js (AES: aes_variance, aes_orthogonality;
    # ShifCon: shifcon_contrastive), by their `ObjectiveMetrics` names.
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
        """The rows' length in tokens (the full, not CP-local, sequence)."""
        return self.microbatches[0].tokens.shape[1]


# --- the batch --------------------------------------------------------------------------------


def fetch_microbatches(state: TrainState, num_microbatches: int) -> list:
    """The step's micro-batches from the loader, on the device, with their priors. A packed
    step (data.packing) has the number its first micro-batch names.

    Args:
        state: The run's state (loader, batch iterator, device).
        num_microbatches: Micro-batches per step and data-parallel rank when unpacked.

    Returns:
        The micro-batches, on `state.device`, with their priors.

    Raises:
        RuntimeError: The data ran out before the step.
    """
    try:
        return [mb.to(state.device).with_priors(state.loader.prior_table)
                for mb in next_step_micro_batches(state.batches, num_microbatches)]
    except StopIteration:
        raise RuntimeError(f"data ran out at step {state.iteration} (consumed "
                           f"{state.consumed_samples} samples)") from None


def prepare_batch(state: TrainState, cfg: TrainConfig, microbatches: list) -> GlobalBatch:
    """The global counts, and each objective's preparation for these micro-batches.

    Zeroes the gradients, then calls every objective's `prepare_step` in turn (anchor forwards
    without gradient, calibration on the first step, weights from the counts).

    Args:
        state: The run's state.
        cfg: The run's config.
        microbatches: This rank's micro-batches of the step, on the device.

    Returns:
        The `GlobalBatch`, its micro-batches carrying what the objectives added to them.
    """
    counts = _global_counts(microbatches, state.device)
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    batch = GlobalBatch(microbatches, *counts)
    step = StepContext(state.chunks, microbatches, *counts, state.device, state.plan,
                       state.process_groups,
                       lambda: _run_schedule(state, cfg, batch, forward_only=True))
    for objective in state.objectives:
        batch.microbatches = step.microbatches = objective.prepare_step(step)
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


# --- forward and backward ---------------------------------------------------------------------


def forward_backward(state: TrainState, cfg: TrainConfig, batch: GlobalBatch) -> list:
    """Forward and backward over the global batch's micro-batches (megatron's pipeline schedule),
    with every objective's router observer on the routers.

    Args:
        state: The run's state.
        cfg: The run's config.
        batch: What `prepare_batch` returned.

    Returns:
        The per-micro-batch CE sums ({"ce": [2] tensor of sum and tokens}), last stage only.
    """
    # The step's LB is read back from megatron's process-wide tracker: start it empty, so a
    # forward outside the step (the anchor passes of online priors and ShifCon, AES
    # calibration, another model in the same process) cannot add to this step's value.
    zero_aux_losses()
    with contextlib.ExitStack() as observing:
        for objective in state.objectives:
            observer = objective.router_observer()
            if observer is not None:
                observing.enter_context(observe_routers(state.chunks, observer))
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
    call it. The loss function sums the CE over response tokens (per-token convention).

    Args:
        state: The run's state (its objectives see the micro-batch first).
        data_iterator: Iterator over this step's micro-batches.
        model: The model chunk this schedule call runs.
    """
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
    for objective in state.objectives:
        objective.set_micro_batch(mb, inputs, padding_mask)
    # The padding mask keeps padding out of megatron's load-balancing statistics and its token
    # count (and out of z-loss and expert-bias counts); nothing else reads it.
    with inputs.rope(model):
        output = model(tokens, inputs.positions, inputs.attention_mask, labels=labels,
                       padding_mask=_stage_padding_mask(state, model, padding_mask))

    ce_weight = math.prod(objective.ce_weight for objective in state.objectives)

    def loss_func(per_token_loss):
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        num_tokens = loss_mask.sum().to(torch.int)
        # the logged CE is unweighted; what is trained is the objectives' weighting of it
        trained = loss_sum if ce_weight == 1 else loss_sum * ce_weight
        return trained, num_tokens, {"ce": torch.stack([loss_sum.detach(), loss_mask.sum()])}

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
    """The step's losses reduced over the ranks (collective).

    Args:
        state: The run's state, after the optimizer step.
        cfg: The run's config.
        batch: The step's `GlobalBatch`.
        reduced: What `forward_backward` returned.
        lr: The learning rate the step used.
        grad_norm: The optimizer's gradient norm, or None.
        started: `time.perf_counter()` at the step's start.

    Returns:
        A `StepRecord`: CE, megatron's load-balancing loss, and each objective's metrics (SARA's
        `js` and its values per aligned layer in their own fields, the others in `terms`).
    """
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

    terms, js_layers = {}, {}
    for objective in state.objectives:
        metrics = objective.metrics(arch.num_layers)
        terms.update(metrics.terms)
        js_layers.update(metrics.per_layer)
    js = terms.pop("js", 0.0)
    elapsed = time.perf_counter() - started
    s = batch.seq_length
    return StepRecord(
        step=state.iteration,
        ce=float(ce[0] / ce[1].clamp_min(1)),
        lb=lb,
        js=js,
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
    before the step's weights can be saved. Every rank sees the same reduced values.

    Args:
        record: The step's reduced values.
        cfg: The run's config (clip_grad: a NaN norm without clipping is not checked;
            checkpoint.save_dir, named in the message).

    Raises:
        NonFiniteError: A term or the gradient norm is not finite, or a JS is negative.
    """
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
