"""One forward-only runner for every pass that reads a model without training it: prior
extraction, the anchor forward of online priors and ShifCon, ShifCon's language vectors and the
routing-divergence analysis.

It owns what those passes must do alike: padding (to the pad multiple, and past the Phi-3
longrope switch whenever training pads past it), laying rows out (one sample per row or packed),
context-parallel slicing, eval mode under megatron's forward-only schedule, and stopping after a
layer (what the kept layers see equals the full forward's). The callers observe the forward
through `observe(index, inputs, rows)`, a context manager active around micro-batch `index`'s
forward on this stage (routing capture, hidden-state hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sara_megatron.data.packing import pack_rows_tokens
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.models.longrope_padding import (
    check_rope_regime,
    longrope_switch,
    regime_padded_length,
)
from sara_megatron.routing.forward_inputs import ModelInputs, forward_inputs


@dataclasses.dataclass
class ForwardRows:
    """One micro-batch of whole rows (before the context-parallel split).

    Attributes:
        tokens: [R, S] int64 token ids, padding 0.
        padding_mask: [R, S] bool, True = padding.
        segment_ids: [R, S] int64, the sample of each token (-1 = padding), or None: one sample
            per row, numbered by row.
        position_ids: [R, S] int64, 0 at each sample's first token; needed when `packed`.
        labels: [R, S] int64 next-token labels within each sample, or None (the tokens stand in:
            the last stage then returns a per-token loss instead of [S, B, V] logits).
        packed: several samples per row: each sample's own positions and the block-diagonal
            mask. False: positions 0..S-1 and the causal mask, whatever `segment_ids` number.
        samples: the number of samples the segment ids number.
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    segment_ids: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    packed: bool = False
    samples: int = 0

    def __post_init__(self):
        if not self.samples:
            self.samples = self.tokens.shape[0]

    def part(self, rows: slice) -> "ForwardRows":
        """The rows `rows` of this batch (segment ids keep their numbering).

        Args:
            rows: the slice of rows to keep.
        """
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return ForwardRows(self.tokens[rows], self.padding_mask[rows], pick(self.segment_ids),
                           pick(self.position_ids), pick(self.labels), self.packed, self.samples)


def lay_out_rows(rows: Sequence[Sequence[np.ndarray]], seq_length: int, packed: bool,
                 pad_id: int = 0) -> ForwardRows:
    """Lay rows of samples out in [R, seq_length] (`data.packing.pack_rows_tokens`).

    Args:
        rows: per row, the token arrays of its samples in order; an empty row is all padding.
        seq_length: the padded length S (`ForwardRunner.padded_length`).
        packed: run the rows packed (per-sample positions, block-diagonal mask); False needs at
            most one sample per row.
        pad_id: the padding token.

    Returns:
        The rows, segment ids numbering the samples row by row (row 0's first sample is 0).

    Raises:
        ValueError: a row holds more than `seq_length` tokens, or several samples unpacked.
    """
    if not packed and any(len(row) > 1 for row in rows):
        raise ValueError("rows of several samples must run packed")
    laid = pack_rows_tokens(rows, [[0] * len(row) for row in rows], seq_length, pad_id)
    return ForwardRows(laid.tokens, laid.padding_mask, laid.segment_ids, laid.position_ids,
                       laid.labels, packed, max(sum(len(row) for row in rows), 1))


def _model_classes():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlock

    return GPTModel, TransformerBlock


@contextlib.contextmanager
def stop_after_layer(chunks, last_layer: Optional[int]):
    """Run only the transformer layers 0..`last_layer` (global, 0-based) inside the block.

    The other layers are taken out of each block, the final norm is skipped and each model
    returns its hidden states instead of the output layer's logits or loss, so the last
    pipeline stage gets [S, B, H]. Restored on exit.

    Args:
        chunks: the model chunks of this rank (megatron `GPTModel`s, wrapped or not).
        last_layer: the last layer to run; None runs the whole model.
    """
    if last_layer is None:
        yield
        return
    gpt_class, block_class = _model_classes()
    saved = []
    for chunk in chunks:
        for module in list(chunk.modules()):
            if isinstance(module, gpt_class):
                saved.append((module, "post_process", module.post_process))
            elif isinstance(module, block_class):
                saved.append((module, "layers", module.layers))
                saved.append((module, "final_layernorm", module.final_layernorm))
    try:
        for module, name, value in saved:
            if name == "post_process":
                module.post_process = False
            elif name == "layers":
                module.layers = torch.nn.ModuleList(
                    [layer for layer in value if layer.layer_number - 1 <= last_layer])
            else:
                module.final_layernorm = None
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    size = dist.get_world_size(group)
    return size, (dist.get_rank(group) if size > 1 else 0)


class ForwardRunner:
    """Forward-only passes over a model's chunks (see the module docstring).

    Args:
        chunks: this rank's model chunks (one model, or a list for virtual pipeline stages).
        device: where the rows are moved before the forward.
        process_groups: megatron's `ProcessGroupCollection` (the TP size sets the pad multiple
            for sequence parallel, the CP group splits the rows); None: one process alone.
        train_length: the length training pads every batch to (the shards' seq_length), which
            decides the longrope regime; None: no regime to follow.
        pad_multiple: padded lengths are also multiples of this.
    """

    def __init__(self, chunks, device, process_groups=None, train_length: Optional[int] = None,
                 pad_multiple: int = 1):
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.device = torch.device(device)
        self.process_groups = process_groups
        tp, _ = _group_size_rank(process_groups.tp if process_groups is not None else None)
        self.cp_size, self.cp_rank = _group_size_rank(
            process_groups.cp if process_groups is not None else None)
        layout = 2 * self.cp_size * tp if self.cp_size > 1 else tp
        self.multiple = math.lcm(pad_multiple, layout)
        self.train_length = train_length
        self.switch = longrope_switch(self.chunks)

    def padded_length(self, longest: int, agree: bool = True) -> int:
        """The length a batch whose longest row has `longest` tokens is padded to.

        Args:
            longest: the batch's longest row, in tokens.
            agree: take the maximum over the world (collective), so that every rank runs the
                same shape (expert parallel exchanges tokens, pipeline stages activations).

        Returns:
            `longest` rounded up to the pad multiple, past the longrope switch when training
            pads past it.

        Raises:
            ValueError: the pad multiple puts the length on the other side of the switch from
                training's.
        """
        train = self.train_length or 0
        length = regime_padded_length(longest, self.multiple, train, self.switch)
        if agree and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([length], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            length = int(t.item())
        if self.train_length is not None:
            check_rope_regime(length, self.train_length, self.switch, self.multiple)
        return length

    def inputs(self, rows: ForwardRows) -> tuple[torch.Tensor, torch.Tensor, ModelInputs]:
        """The model-call inputs of `rows` on this context-parallel rank.

        Args:
            rows: whole rows [R, S] (moved to this runner's device and CP-sliced here).

        Returns:
            (tokens [R, S_local], labels [R, S_local], `ModelInputs`); labels are the tokens
            when `rows.labels` is None.
        """
        device, rank, size = self.device, self.cp_rank, self.cp_size
        tokens, padding = rows.tokens.to(device), rows.padding_mask.to(device)
        segments = None if rows.segment_ids is None else rows.segment_ids.to(device)
        if rows.packed:
            inputs = forward_inputs(tokens, context_parallel_slice(padding, rank, size),
                                    rows.position_ids.to(device), segments, rank, size)
        else:
            inputs = forward_inputs(tokens, context_parallel_slice(padding, rank, size),
                                    cp_rank=rank, cp_size=size)
            if segments is not None:  # the caller's numbering (e.g. over a step's micro-batches)
                inputs.segment_ids = context_parallel_slice(segments, rank, size)
        labels = tokens if rows.labels is None else rows.labels.to(device)
        return (context_parallel_slice(tokens, rank, size),
                context_parallel_slice(labels, rank, size), inputs)

    @torch.no_grad()
    def run(self, microbatches: Sequence[ForwardRows],
            observe: Optional[Callable[[int, ModelInputs, ForwardRows], ContextManager]] = None,
            stop_after: Optional[int] = None,
            loss: Optional[Callable[[int, ForwardRows, torch.Tensor], torch.Tensor]] = None
            ) -> None:
        """Forward `microbatches` through megatron's schedule, without gradient, in eval mode.

        Collective over the model-parallel ranks (and over every rank that shares expert or
        pipeline exchanges): all run the same number of micro-batches of the same shape.

        Args:
            microbatches: rows of equal shape [R, S] (whole rows; this runner slices them for
                context parallel).
            observe: `observe(index, inputs, rows)` gives a context manager active around
                micro-batch `index`'s forward on this stage; `inputs.segment_ids` are the
                CP-local [R, S_local] ids the routing capture takes.
            stop_after: run the layers 0..stop_after only (`stop_after_layer`); None: all.
            loss: `loss(index, rows, per_token_loss)` on the last stage, [R, S_local] next-token
                losses against `rows.labels`; its value is not used for anything but the
                caller's record. Not with `stop_after` (no output layer runs).

        Raises:
            ValueError: micro-batches of different shapes, or `loss` with `stop_after`.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            return
        shapes = {tuple(mb.tokens.shape) for mb in microbatches}
        if len(shapes) != 1:
            raise ValueError(f"one forward runs micro-batches of one shape, got {sorted(shapes)}")
        if loss is not None and stop_after is not None:
            raise ValueError("a forward stopped after a layer has no output layer to take a "
                             "loss from")
        observe = observe or (lambda index, inputs, rows: contextlib.nullcontext())

        def forward_step(data_iterator, model):
            index, rows = next(data_iterator)
            tokens, labels, inputs = self.inputs(rows)
            with observe(index, inputs, rows), inputs.rope(model):
                out = model(tokens, inputs.positions, inputs.attention_mask, labels=labels)
            if loss is None:
                return out, lambda t: (t.float().sum() * 0, torch.ones((), dtype=torch.int), {})
            return out, lambda t: (loss(index, rows, t), {})

        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()  # deterministic routing: no jitter, no sparsemixer sampling
        try:
            with stop_after_layer(self.chunks, stop_after):
                iterators = [iter(enumerate(microbatches)) for _ in self.chunks]
                r, s = next(iter(shapes))
                get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
                    model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                    num_microbatches=len(microbatches),
                    seq_length=s,  # whole rows: the schedule divides by CP itself
                    micro_batch_size=r,
                    forward_only=True,
                )
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)
