"""What a forward of token rows feeds the model beside the tokens, packed or not: positions, the
attention mask, and the segment ids the routing capture and the routing losses read.

One place for the training forward (`training/packed_step.model_inputs`) and the anchor forward
of online priors and ShifCon (`sara/online_priors.py`): both run rows that hold one sample each
(positions 0..S-1, causal mask, one segment per row) or several (each sample's own positions and
segment, block-diagonal mask: `models/packed_attention.py`, docs/packing.md). It lives here, below
`sara` and `training`, because both import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from sara_megatron.models.builder import causal_attention_mask
from sara_megatron.models.context_parallel import context_parallel_slice
from sara_megatron.models.packed_attention import packed_attention_mask, packed_rope
from sara_megatron.routing.capture import segment_ids_from_padding_mask


@dataclasses.dataclass
class ModelInputs:
    """What the forward step feeds the model beside tokens and labels, packed or not."""

    positions: torch.Tensor  # [B, S_local]
    attention_mask: torch.Tensor  # bool, True = masked out
    segment_ids: torch.Tensor  # [B, S_local], -1 = padding (capture, SARA)
    packed: bool

    def rope(self, model):
        """Context for the model call: per-sample RoPE positions when packed.

        Args:
            model: the model about to be called (a GPTModel, or wrapped).
        """
        return packed_rope(model, self.positions) if self.packed else contextlib.nullcontext()


def forward_inputs(tokens: torch.Tensor, padding_mask: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None,
                   segment_ids: Optional[torch.Tensor] = None, cp_rank: int = 0,
                   cp_size: int = 1) -> ModelInputs:
    """Positions, attention mask and segment ids of the whole rows `tokens` on this CP rank.

    Unpacked (`segment_ids` None): positions 0..S-1, a causal mask over this rank's S_local
    tokens and one segment per row. Packed: each sample's own positions and segment, and the
    block-diagonal mask of the whole rows (the CP attention cuts it).

    Args:
        tokens: [B, S] token ids of the whole rows.
        padding_mask: [B, S_local] bool, True = padding: the CP-local part of the rows' mask.
        position_ids: [B, S] per-sample positions of the whole rows; needed when packed.
        segment_ids: [B, S] sample index of each token of the whole rows (-1 = padding), or
            None for one sample per row.
        cp_rank, cp_size: this rank's place in the context-parallel group.

    Returns:
        The `ModelInputs`: positions and segment ids [B, S_local], the mask
        ([1, 1, S_local, S_local] causal, or [B, 1, S, S] block-diagonal when packed), and
        whether packed.

    Raises:
        ValueError: `segment_ids` given without `position_ids`.
    """
    b, s = tokens.shape
    if segment_ids is None:
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        positions = context_parallel_slice(positions, cp_rank, cp_size)
        return ModelInputs(positions, causal_attention_mask(positions.shape[1], tokens.device),
                           segment_ids_from_padding_mask(padding_mask), False)
    if position_ids is None:
        raise ValueError("packed rows need their position ids beside their segment ids")
    positions, segments = (context_parallel_slice(t, cp_rank, cp_size)
                           for t in (position_ids, segment_ids))
    return ModelInputs(positions, packed_attention_mask(segment_ids), segments, True)
