"""The dense routing report of a model on synthetic tokens, at any TP / EP layout
(`tools/routing_report.py`): every layer's masked sequence-mean routing distribution.

Each data-parallel rank routes its own random sequences (the last one right-padded, so the report
shows that padding is left out); rank 0 gathers and prints every row.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sara_megatron.checkpointing import load_model_weights
from sara_megatron.distributed import ParallelConfig, initialize_distributed, model_process_groups
from sara_megatron.io import atomic_open
from sara_megatron.models.builder import build_model, causal_attention_mask
from sara_megatron.routing import capture_routing, segment_ids_from_padding_mask
from sara_megatron.routing.report import format_routing_report, routing_rows


def dense_routing_report(
    arch,
    *,
    preset: str,
    layers: Sequence[int],
    checkpoint: Optional[str] = None,
    tp: int = 1,
    ep: int = 1,
    sequences_per_rank: int = 2,
    seq_length: int = 32,
    seed: int = 1234,
    json_path: Optional[str] = None,
) -> Optional[list[dict]]:
    """Collective: start Megatron at (tp, ep), build `arch` (random weights, or `checkpoint`'s)
    and route this data-parallel rank's sequences.

    Args:
        arch: The model's `MoEArchitecture`.
        preset: The preset's name, printed in the report's header.
        layers: The layers whose routing is captured (global, 0-based).
        checkpoint: A Megatron checkpoint to load; None: random weights.
        tp: The tensor-parallel size.
        ep: The expert-parallel size.
        sequences_per_rank: Random sequences per data-parallel rank (the last one right-padded
            over its last quarter).
        seq_length: Tokens per sequence.
        seed: The seed of Megatron and of the tokens (plus the data-parallel rank).
        json_path: Where rank 0 writes the rows as JSON; None: nowhere.

    Returns:
        On rank 0, the report's rows (every data-parallel rank's sequences), which it also
        prints; None on the other ranks.
    """
    arch.validate_parallel(tp=tp, ep=ep)
    initialize_distributed(ParallelConfig(tp=tp, ep=ep), seed=seed)
    from megatron.core import parallel_state as ps

    model = build_model(arch)
    if checkpoint:
        load_model_weights(model, checkpoint)
    model.eval()
    device = next(model.parameters()).device
    dp_rank = ps.get_data_parallel_rank()
    b, s = sequences_per_rank, seq_length
    g = torch.Generator().manual_seed(seed + dp_rank)
    tokens = torch.randint(0, arch.vocab_size, (b, s), generator=g).to(device)
    padding = torch.zeros(b, s, dtype=torch.bool, device=device)
    padding[-1, s - s // 4:] = True
    positions = torch.arange(s, device=device).expand(b, s)
    with torch.no_grad(), capture_routing(
        model, segment_ids_from_padding_mask(padding), layers=layers,
        process_groups=model_process_groups(),
    ) as capture:
        model(tokens, positions, causal_attention_mask(s, device=device))
    rows = routing_rows(capture, sequence_offset=dp_rank * b)
    # Tensor-parallel ranks hold the same rows; one of them speaks for the group.
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows if ps.get_tensor_model_parallel_rank() == 0 else [])
    if dist.get_rank() != 0:
        return None
    all_rows = [r for part in gathered for r in part]
    print(f"dense routing report: preset={preset} experts={arch.num_experts} "
          f"top-k={arch.moe_router_topk} world={dist.get_world_size()} "
          f"tp={tp} ep={ep} dp={ps.get_data_parallel_world_size()}")
    print(format_routing_report(all_rows, arch.num_experts))
    if json_path:
        with atomic_open(json_path) as f:
            json.dump(all_rows, f, indent=1)
    return all_rows
