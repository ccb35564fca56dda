"""Online anchor priors (`sara.priors: online`): the anchor forward in the same step.

Instead of priors extracted once from the model before fine-tuning (the prior store), each
micro-batch carries the anchor rows of its samples (`SaraDataConfig.anchor_rows`); before the
training forward, the model being trained runs those rows forward without gradient — through
megatron's schedule, so pipeline stages pass activations as in training — and the dense routing
capture gives each aligned layer's sequence-mean routing [B, N] of every anchor. Those are the
priors JS is taken against: priors that follow the model as it trains, with no extraction pass
and no store. At step 0 they equal the store's priors (same weights, same samples).

As in extraction the anchor forward runs in eval mode (deterministic routing: no jitter, no
sparsemixer sampling) and pads like the training batch; with causal attention and right padding
the padding does not change a sequence's routing. Each stage fills the rows of its own layers
(the rest stay 0 and are never read there: `SaraRoutingLoss` reads the layers it routes).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from sara_megatron.models.builder import causal_attention_mask
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.routing import capture_routing, segment_ids_from_padding_mask


@torch.no_grad()
def run_anchor_forward(chunks, microbatches, device, observe, process_groups=None) -> None:
    """Forward the anchor rows of `microbatches` through megatron's schedule without gradient,
    in eval mode; `observe(index, segment_ids)` gives a context manager active around micro-batch
    `index`'s forward on this stage (segment ids [B, S_local], CP-local, -1 = padding).
    `process_groups`: megatron's (the context-parallel group splits the rows); None: one process."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if any(mb.anchor_tokens is None for mb in microbatches):
        raise ValueError("the anchor forward needs batches with anchor rows "
                         "(SaraDataConfig.anchor_rows)")
    cp_group = process_groups.cp if process_groups is not None else None
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_size > 1 else 0

    def forward_step(data_iterator, model):
        index, mb = next(data_iterator)
        b, s = mb.anchor_tokens.shape
        tokens, padding = mb.anchor_tokens.to(device), mb.anchor_padding_mask.to(device)
        positions = torch.arange(s, device=device).expand(b, s)
        if cp_size > 1:
            tokens, padding, positions = (context_parallel_slice(t, cp_rank, cp_size)
                                          for t in (tokens, padding, positions))
        with observe(index, segment_ids_from_padding_mask(padding)):
            # Labels only so the last stage returns a per-token loss (ignored) instead of logits.
            out = model(tokens, positions, causal_attention_mask(tokens.shape[1], device),
                        labels=tokens)
        return out, lambda t: (t.float().sum() * 0, torch.ones((), dtype=torch.int), {})

    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        iterators = [iter(enumerate(microbatches)) for _ in chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=microbatches[0].anchor_tokens.shape[1],
            micro_batch_size=microbatches[0].anchor_tokens.shape[0],
            forward_only=True,
        )
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def online_anchor_priors(chunks, microbatches, layers, num_experts: int, device,
                         process_groups=None) -> list[torch.Tensor]:
    """[L_sel, B, N] fp32 anchor priors of each micro-batch (`SaraMicroBatch` with anchor rows)
    for this stage's layers among `layers`; collective over the model-parallel ranks
    (`process_groups`: megatron's, None for one process alone)."""
    position = {layer: i for i, layer in enumerate(layers)}
    priors = [torch.zeros(len(layers), mb.anchor_tokens.shape[0], num_experts, device=device)
              if mb.anchor_tokens is not None else None for mb in microbatches]

    @contextlib.contextmanager
    def observe(index, segments):
        with capture_routing(chunks, segments, layers=layers, keep_probs=False,
                             process_groups=process_groups) as capture:
            yield
        for layer, record in capture.records.items():
            priors[index][position[layer]] = record.seq_mean.float()

    run_anchor_forward(chunks, microbatches, device, observe, process_groups)
    return priors
