"""The trainer's side of sequence packing (`data.packing`, docs/packing.md).

A packed micro-batch (`SaraMicroBatch` with `segment_ids`) carries several samples per row; a
packed step's number of micro-batches varies (`step_micro_batches`). These helpers give the
trainer what it feeds the model for such a batch (`model_inputs`, for unpacked ones too) and
refuse what packing does not support.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import torch

from sara_megatron.models.builder import causal_attention_mask
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.models.packed_attention import (
    check_packing_supported,
    packed_attention_mask,
    packed_rope,
)
from sara_megatron.routing import segment_ids_from_padding_mask

log = logging.getLogger(__name__)


def check_packing_config(cfg, arch, seq_length: int, *, use_te: bool,
                         context_parallel: int) -> None:
    """Refuse at start what packing does not support (each with the setting to change).
    `seq_length`: the rows' length (data.seq_length, or the shards')."""
    d, s = cfg.data, cfg.sara
    if d.mock:
        raise ValueError("data.packing needs real shards: data.mock rows are full-length")
    if s.objective != "sara" or s.priors != "store":
        raise NotImplementedError(
            f"sequence packing with sara.objective={s.objective} / sara.priors={s.priors} is "
            "not implemented (they need each sample's anchor row): set data.packing=false")
    if use_te:
        raise NotImplementedError(
            "sequence packing with Transformer Engine (the thd layout, "
            "models.packed_attention.thd_packed_inputs) is not wired into the trainer yet: "
            "set data.packing=false, or run the local spec")
    check_packing_supported(arch, seq_length, use_te=use_te,
                            context_parallel=context_parallel)


@dataclasses.dataclass
class ModelInputs:
    """What the forward step feeds the model beside tokens and labels, packed or not."""

    positions: torch.Tensor  # [B, S_local]
    attention_mask: torch.Tensor  # bool, True = masked out
    segment_ids: torch.Tensor  # [B, S_local], -1 = padding (capture, SARA)
    packed: bool

    def rope(self, model):
        """Context for the model call: per-sample RoPE positions when packed."""
        return packed_rope(model, self.positions) if self.packed else contextlib.nullcontext()


def model_inputs(mb, padding_mask: torch.Tensor, cp_rank: int = 0, cp_size: int = 1
                 ) -> ModelInputs:
    """Positions, attention mask and segment ids of micro-batch `mb` on this CP rank
    (`padding_mask`: its CP-local part). Unpacked: positions 0..S-1, a causal mask over this
    rank's S_local tokens and one segment per row. Packed: each sample's own positions and
    segment, and the block-diagonal mask of the whole rows (the CP attention cuts it)."""
    b, s = mb.tokens.shape
    if mb.segment_ids is None:
        positions = torch.arange(s, device=mb.tokens.device).expand(b, s)
        positions = context_parallel_slice(positions, cp_rank, cp_size)
        return ModelInputs(positions, causal_attention_mask(positions.shape[1], mb.tokens.device),
                           segment_ids_from_padding_mask(padding_mask), False)
    positions, segments = (context_parallel_slice(t, cp_rank, cp_size)
                           for t in (mb.position_ids, mb.segment_ids))
    return ModelInputs(positions, packed_attention_mask(mb.segment_ids), segments, True)


def next_step_micro_batches(batches, fallback: int) -> list:
    """One step's micro-batches from the loader's iterator: `fallback` of them unpacked, the
    number the first one names when packed."""
    first = next(batches)
    count = first.step_micro_batches or fallback
    return [first] + [next(batches) for _ in range(count - 1)]


def sequences_in(mb) -> torch.Tensor:
    """Samples with a token in a micro-batch: packed, its samples; else its non-empty rows."""
    if mb.segment_ids is not None:
        return torch.tensor(float(len(mb.sample_ids)), dtype=torch.float64,
                            device=mb.tokens.device)
    return (~mb.padding_mask).any(dim=1).sum()


def log_fill_rate(loader, max_steps: int = 200) -> None:
    """Log the packed and padded fill rates of the first steps (rank 0's call)."""
    from sara_megatron.data.packed_loader import packed_fill_rate

    sampler = loader.batch_sampler
    steps = min(max_steps, sampler.steps())
    packed, padded = packed_fill_rate(sampler, steps)
    log.info("data.packing: fill rate %.1f%% (padded: %.1f%%) over the first %d steps of %d "
             "samples at seq_length %d: %.2fx fewer rows", 100 * packed, 100 * padded, steps,
             sampler.global_batch_size, sampler.seq_length, packed / max(padded, 1e-12))
