"""Online anchor priors (`sara.priors: online`): the anchor forward in the same step.

Instead of priors extracted once before fine-tuning (the prior store), each micro-batch carries
the anchor rows of its samples (`SaraDataConfig.anchor_rows`); before the training forward, the
model being trained runs them forward without gradient through the forward runner (eval mode,
padded like the training batch, stopping after the last aligned layer), and the routing capture
gives each aligned layer's sequence-mean routing of every anchor: priors that follow the model
as it trains (equal to the store's at step 0). Packed anchors give [L_sel, n, N] over the
micro-batch's n samples; every anchor micro-batch of the step is padded with all-padding rows
to the most rows any rank's has, since megatron's schedule runs one shape per call
(docs/objectives.md, docs/data-and-priors.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from sara_megatron.routing import capture_routing
from sara_megatron.routing.forward_runner import ForwardRows, ForwardRunner

# Where SARA's anchor priors come from (`sara.priors`): the offline prior store, or the anchor
# forward of each step (this module).
PRIOR_SOURCES = ("store", "online")


@dataclasses.dataclass
class AnchorRowsView:
    """One micro-batch's anchor rows, padded to the step's row count."""

    tokens: torch.Tensor  # [R, S]
    padding_mask: torch.Tensor  # [R, S] True = padding
    position_ids: Optional[torch.Tensor]  # [R, S] packed, else None
    segment_ids: Optional[torch.Tensor]  # [R, S] packed (segment k = sample k), else None
    samples: int  # anchors in the rows: the micro-batch's samples (unpacked: its rows)


def _pad_rows(t: torch.Tensor, rows: int, value) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def anchor_rows_view(mb, rows: int) -> AnchorRowsView:
    """Micro-batch `mb`'s anchor rows padded with all-padding rows to `rows` (>= its own).

    Args:
        mb: a micro-batch with anchor rows (`anchor_tokens`, `anchor_padding_mask`; packed:
            `anchor_position_ids`, `anchor_segment_ids`).
        rows: the step's row count (`anchor_row_count`).

    Returns:
        The padded `AnchorRowsView` (padding rows: token 0, all padding, segment -1).
    """
    position_ids = getattr(mb, "anchor_position_ids", None)
    segment_ids = getattr(mb, "anchor_segment_ids", None)
    samples = len(mb.sample_ids) if segment_ids is not None else mb.anchor_tokens.shape[0]
    return AnchorRowsView(
        _pad_rows(mb.anchor_tokens, rows, 0), _pad_rows(mb.anchor_padding_mask, rows, True),
        None if position_ids is None else _pad_rows(position_ids, rows, 0),
        None if segment_ids is None else _pad_rows(segment_ids, rows, -1), samples)


def anchor_row_count(microbatches, device) -> int:
    """The most anchor rows of any micro-batch of the step, over every rank (collective when
    distributed: all ranks run the anchor forward together).

    Args:
        microbatches: the step's micro-batches on this rank.
        device: where the all-reduce's tensor lives (the backend's device).
    """
    rows = max(mb.anchor_tokens.shape[0] for mb in microbatches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([rows], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows = int(t.item())
    return rows


def run_anchor_forward(chunks, microbatches, device, observe, process_groups=None,
                       stop_after: Optional[int] = None) -> None:
    """Forward the anchor rows of `microbatches` through the forward runner, without gradient,
    in eval mode.

    Args:
        chunks: this rank's model chunks.
        microbatches: the step's micro-batches (with anchor rows: `SaraDataConfig.anchor_rows`).
        device: where the rows run.
        observe: `observe(index, segment_ids, samples)` gives a context manager active around
            micro-batch `index`'s forward on this stage (segment ids [R, S_local], CP-local,
            -1 = padding, numbering its `samples` anchors).
        process_groups: megatron's (the context-parallel group splits the rows); None: one
            process.
        stop_after: run the layers 0..stop_after only (what the observers read); None: all.

    Raises:
        ValueError: a micro-batch without anchor rows.
    """
    if any(mb.anchor_tokens is None for mb in microbatches):
        raise ValueError("the anchor forward needs batches with anchor rows "
                         "(SaraDataConfig.anchor_rows)")
    rows = anchor_row_count(microbatches, device)
    views = [anchor_rows_view(mb, rows) for mb in microbatches]
    batches = [ForwardRows(v.tokens, v.padding_mask, v.segment_ids, v.position_ids,
                           packed=v.segment_ids is not None, samples=v.samples) for v in views]
    runner = ForwardRunner(chunks, device, process_groups)
    runner.run(batches, lambda index, inputs, view: observe(index, inputs.segment_ids,
                                                            view.samples),
               stop_after=stop_after)


def online_anchor_priors(chunks, microbatches, layers, num_experts: int, device,
                         process_groups=None) -> list[torch.Tensor]:
    """The anchor priors of each micro-batch, from a forward of its anchor rows.

    Collective over the model-parallel ranks.

    Args:
        chunks: this rank's model chunks.
        microbatches: `SaraMicroBatch`es with anchor rows.
        layers: the aligned layers (global, 0-based); the forward stops after the last.
        num_experts: N.
        device: where the forward runs.
        process_groups: megatron's; None for one process alone.

    Returns:
        Per micro-batch, [L_sel, B, N] fp32 sequence-mean routing (B: its rows; packed, its
        samples in their order) for this stage's layers among `layers` (other rows 0).
    """
    position = {layer: i for i, layer in enumerate(layers)}
    priors = {}

    @contextlib.contextmanager
    def observe(index, segments, samples):
        if index not in priors:  # virtual pipeline stages: one forward per chunk
            priors[index] = torch.zeros(len(layers), samples, num_experts, device=device)
        with capture_routing(chunks, segments, layers=layers, keep_probs=False,
                             num_segments=samples, process_groups=process_groups) as capture:
            yield
        for layer, record in capture.records.items():
            priors[index][position[layer]] = record.seq_mean.float()

    # Layers past the last aligned one feed nothing the priors read: the forward stops there.
    run_anchor_forward(chunks, microbatches, device, observe, process_groups,
                       stop_after=max(layers))
    return [priors[i] for i in range(len(microbatches))]
