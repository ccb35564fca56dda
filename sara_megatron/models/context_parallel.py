"""Context parallel without Transformer Engine: the local spec's attention over all-gathered K/V.

Megatron splits each sequence of S tokens into 2·cp chunks and gives CP rank r chunks r and
2·cp−1−r (`megatron.core.utils.get_batch_on_this_cp_rank`), so that causal attention costs every
rank the same. Megatron's own local `DotProductAttention` refuses cp > 1 (its CP attention is
Transformer Engine's ring attention), which leaves CPU and TE-less GPUs without context parallel.
`ContextParallelDotProductAttention` fills that gap the simple way: every rank all-gathers the
keys and values of the CP group (autograd: all-gather forward, reduce-scatter backward), and
masks by the tokens' global positions. Memory is O(S_local · S) per head, like the local spec's
attention at S; on GPUs with TE the model uses TE's ring attention instead.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def context_parallel_positions(
    seq_length: int, cp_rank: int, cp_size: int, device=None
) -> torch.Tensor:
    """Global positions of the tokens CP rank `cp_rank` holds, in its local order (the layout of
    `get_batch_on_this_cp_rank`: chunks cp_rank and 2·cp_size−1−cp_rank of 2·cp_size).

    Args:
        seq_length: S, the whole sequence's length.
        cp_rank, cp_size: the rank's place in the context-parallel group.
        device: where the result is made.

    Returns:
        [S / cp_size] int64 positions (all of 0..S-1 when cp_size is 1).

    Raises:
        ValueError: S is not divisible by 2·cp_size.
    """
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 × context parallel size "
            f"{cp_size}: megatron's load-balanced CP layout cuts each sequence in 2·cp chunks"
        )
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


class ContextParallelDotProductAttention(DotProductAttention):
    """megatron's `DotProductAttention`, also for context parallel > 1 (see module docstring).

    At cp = 1 it is megatron's class unchanged. Under CP the attention is causal by token position
    (the only mask type megatron's CP supports). A mask argument over the whole sequence,
    [B, 1, S, S] with S = S_local·cp (packed rows: `packed_attention.packed_attention_mask` of
    the micro-batch before the CP split), is also applied, at the global positions of this rank's
    queries and the gathered keys; a mask of any other size is not used.

    Args:
        config: the model's `TransformerConfig` (its `context_parallel_size` is read).
        layer_number, attention_type, *args, **kwargs: passed to megatron's class.
        attn_mask_type: must be causal under CP (the parent is then built with "padding").

    Raises:
        ValueError: another mask type under CP.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        self.cp_size = config.context_parallel_size
        base_config = config
        if self.cp_size > 1:
            if attn_mask_type != AttnMaskType.causal:
                raise ValueError(
                    f"context parallel attention supports causal masks only, got {attn_mask_type}"
                )
            # The parent refuses cp > 1; give it a copy that says 1. The softmax is built as
            # "padding" so that a fused kernel, if present, applies our [sq, S] position mask
            # rather than assuming a square causal one.
            base_config = copy.copy(config)
            base_config.context_parallel_size = 1
            attn_mask_type = AttnMaskType.padding
        super().__init__(base_config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        self.config = config
        self.cp_group = ps.get_context_parallel_group() if self.cp_size > 1 else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ):
        """Attention of this rank's queries over the CP group's all-gathered keys and values.

        Args:
            query: [S_local, B, heads / tp, head_dim].
            key, value: [S_local, B, query groups / tp, head_dim] of this rank.
            attention_mask: None, or bool [B, 1, S, S] over the whole sequence (True = masked
                out), applied beside the causal mask; other shapes are ignored under CP.
            attn_mask_type, attention_bias, packed_seq_params: as megatron's; under CP the mask
                type is ignored (causal by position) and packed_seq_params must be None.

        Returns:
            [S_local, B, heads / tp · head_dim], as megatron's `DotProductAttention`.

        Raises:
            NotImplementedError: `packed_seq_params` under CP (needs Transformer Engine).
        """
        if self.cp_size == 1:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences under context parallel need Transformer Engine's attention"
            )
        cp_rank = ps.get_context_parallel_rank()
        local = query.shape[0]
        seq_length = local * self.cp_size
        # [S_local, b, ng, hn] per rank -> [S_local·cp, b, ng, hn] in rank order; the backward
        # reduce-scatters, so each rank's K/V receive the gradient of every rank's queries.
        key = gather_from_sequence_parallel_region(key, True, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        query_positions = context_parallel_positions(seq_length, cp_rank, self.cp_size, query.device)
        key_positions = torch.cat([
            context_parallel_positions(seq_length, rank, self.cp_size, query.device)
            for rank in range(self.cp_size)
        ])
        # megatron's mask convention: True = masked out.
        mask = (key_positions[None, :] > query_positions[:, None])[None, None]
        if attention_mask is not None and attention_mask.shape[-2:] == (seq_length, seq_length):
            mask = mask | attention_mask.index_select(-2, query_positions).index_select(
                -1, key_positions)
        return super().forward(query, key, value, mask, AttnMaskType.padding, attention_bias, None)


def context_parallel_slice(
    tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1
) -> torch.Tensor:
    """The part of a [..., S, ...] batch tensor (sequence along `dim`) that CP rank `cp_rank`
    holds, in megatron's load-balanced layout (`context_parallel_positions`).

    Args:
        tensor: the whole batch tensor, e.g. tokens [B, S].
        cp_rank, cp_size: the rank's place in the context-parallel group.
        dim: the sequence dimension.

    Returns:
        The tensor with S / cp_size positions along `dim` (itself when cp_size is 1).

    Raises:
        ValueError: S is not divisible by 2·cp_size.
    """
    if cp_size == 1:
        return tensor
    positions = context_parallel_positions(tensor.shape[dim], cp_rank, cp_size, tensor.device)
    return tensor.index_select(dim, positions)
