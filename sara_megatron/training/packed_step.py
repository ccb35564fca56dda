"""The trainer's side of sequence packing (`data.packing`, docs/packing.md).

A packed micro-batch (`SaraMicroBatch` with `segment_ids`) carries several samples per row; a
packed step's number of micro-batches varies (`step_micro_batches`). These helpers give the
trainer what it feeds the model for such a batch (`model_inputs`, for unpacked ones too) and
refuse what packing does not support.
"""

from __future__ import annotations

import logging
import torch

from sara_megatron.models.packed_attention import check_packing_supported
from sara_megatron.routing.forward_inputs import ModelInputs, forward_inputs

log = logging.getLogger(__name__)


def check_packing_config(cfg, arch, seq_length: int, *, use_te: bool,
                         context_parallel: int) -> None:
    """Refuse at start what packing does not support (each with the setting to change).

    Args:
        cfg: The run's `TrainConfig`.
        arch: The model's `MoEArchitecture`.
        seq_length: The rows' length (data.seq_length, or the shards').
        use_te: Whether the model is built with Transformer Engine's layer spec.
        context_parallel: The context-parallel size.

    Raises:
        ValueError: One line naming what packing does not support and the setting to change.
    """
    d = cfg.data
    if d.mock:
        raise ValueError("data.packing needs real shards: data.mock rows are full-length")
    if use_te:
        raise ValueError("data.packing with Transformer Engine is not supported: set "
                         "data.packing=false, or model.use_te=false (the local spec)")
    check_packing_supported(arch, seq_length, use_te=use_te,
                            context_parallel=context_parallel)


def model_inputs(mb, padding_mask: torch.Tensor, cp_rank: int = 0, cp_size: int = 1
                 ) -> ModelInputs:
    """Positions, attention mask and segment ids of micro-batch `mb` on this CP rank
    (`padding_mask`: its CP-local part), packed or not (`routing.forward_inputs`, which the
    anchor forward of online priors and ShifCon shares).

    Args:
        mb: The micro-batch (`SaraMicroBatch`).
        padding_mask: This CP rank's part of its padding mask, [batch, seq / cp_size] bool, True
            = padding.
        cp_rank: This rank's context-parallel rank.
        cp_size: The context-parallel size.

    Returns:
        The `ModelInputs` (positions and segment ids [batch, seq / cp_size], the attention mask).
    """
    return forward_inputs(mb.tokens, padding_mask, mb.position_ids, mb.segment_ids, cp_rank,
                          cp_size)


def next_step_micro_batches(batches, fallback: int) -> list:
    """One step's micro-batches from the loader's iterator: `fallback` of them unpacked, the
    number the first one names when packed.

    Args:
        batches: The loader's iterator of micro-batches.
        fallback: The micro-batches per step when unpacked.

    Returns:
        The step's micro-batches.
    """
    first = next(batches)
    count = first.step_micro_batches or fallback
    return [first] + [next(batches) for _ in range(count - 1)]


def sequences_in(mb) -> torch.Tensor:
    """Samples with a token in a micro-batch: packed, its samples; else its non-empty rows.

    Args:
        mb: The micro-batch (`SaraMicroBatch`).

    Returns:
        The count, a 0-dim tensor on the batch's device.
    """
    if mb.segment_ids is not None:
        return torch.tensor(float(len(mb.sample_ids)), dtype=torch.float64,
                            device=mb.tokens.device)
    return (~mb.padding_mask).any(dim=1).sum()


def log_fill_rate(loader, max_steps: int = 200) -> None:
    """Log the packed and padded fill rates of the first steps (rank 0's call).

    Args:
        loader: The packed data loader (its `batch_sampler`).
        max_steps: How many of the first steps are measured.
    """
    from sara_megatron.data.packed_loader import packed_fill_rate

    sampler = loader.batch_sampler
    steps = min(max_steps, sampler.steps())
    packed, padded = packed_fill_rate(sampler, steps)
    log.info("data.packing: fill rate %.1f%% (padded: %.1f%%) over the first %d steps of %d "
             "samples at seq_length %d: %.2fx fewer rows", 100 * packed, 100 * padded, steps,
             sampler.global_batch_size, sampler.seq_length, packed / max(padded, 1e-12))
