"""The model side of sequence packing: attention within each sample, positions from 0 per sample.

A packed row holds several samples (segment ids, -1 = padding; `data/packing.py`). Two layouts:

- bshd, the local spec (CPU, GPUs without Transformer Engine): the rows stay [B, S]; attention
  gets a block-diagonal causal mask from the segment ids (`packed_attention_mask`), and RoPE gets
  each token's own position (`packed_rope`: megatron's GPTModel applies RoPE by place in the row,
  so the rotary table it computes is re-indexed by the position ids). Under context parallel
  each rank feeds its chunks of every row; the mask stays the whole row's, which
  `ContextParallelDotProductAttention` cuts to its queries and the gathered keys.
- thd, Transformer Engine: the rows are flattened to one [1, B·S] sequence and megatron-core's
  `PackedSeqParams` (cu_seqlens) tell TE's attention and RoPE where each sample starts
  (`thd_packed_inputs`).

Phi-3.5 longrope picks its factors by the forward's rotary length. Under bshd that is the row
length, seq_length — the length every sample is padded to in the unpacked run — so each sample
gets exactly the factors its own padded forward gets. Under thd megatron takes the rotary length
from max_seqlen (the longest sample), which would put a short-sample step on the other side of the
switch: refused where the two can differ (`check_packing_supported`).
"""

from __future__ import annotations

import contextlib
import torch


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] segment ids -> [B, 1, S, S] bool, True = masked out (megatron's convention): a
    token sees the earlier tokens of its own sample. Padding (-1) sees earlier padding only, so
    no softmax row is empty."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment ids must be [B, S], got {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


@contextlib.contextmanager
def packed_rope(model, position_ids: torch.Tensor):
    """During a forward of `model` (a GPTModel, or wrapped), RoPE rotates each token by its own
    position in `position_ids` [B, S] rather than by its place in the row (under context
    parallel: this rank's tokens, as `context_parallel_slice` cuts them). The rotary table
    megatron computes ([S, 1, 1, D]) is gathered per token into [S, B, 1, D], which megatron's
    unfused RoPE broadcasts over heads (the fused one takes [S, 1, 1, D] only: refused)."""
    from megatron.core.utils import get_attr_wrapped_model

    rotary = get_attr_wrapped_model(model, "rotary_pos_emb", allow_none=True)
    if rotary is None:  # no rope in this model
        yield
        return
    config = get_attr_wrapped_model(model, "config")
    if config.apply_rope_fusion:
        raise NotImplementedError("packed rows in the bshd layout need the unfused RoPE; with "
                                  "Transformer Engine use the thd layout (thd_packed_inputs)")
    cp = config.context_parallel_size
    index = position_ids.transpose(0, 1)  # [S, B] (this CP rank's tokens under CP)

    def per_token(module, args, output):
        # Under CP megatron hands this rank its slice of the table; positions index the whole.
        table = (module.get_emb(output.shape[0] * cp) if cp > 1 else output)[:, 0, 0, :]
        if int(index.max()) >= table.shape[0]:
            raise ValueError(f"position id {int(index.max())} beyond the rotary table "
                             f"({table.shape[0]} positions)")
        return table[index.to(table.device)].unsqueeze(2)

    handle = rotary.register_forward_hook(per_token)
    try:
        yield
    finally:
        handle.remove()


def check_packing_supported(arch, seq_length: int, *, use_te: bool, context_parallel: int) -> None:
    """Refuse what packing cannot do the same as the padded run (see the module docstring)."""
    if use_te and context_parallel > 1:
        raise NotImplementedError("sequence packing under context parallel with Transformer "
                                  "Engine (thd with CP) is not implemented")
    if use_te and arch.longrope is not None and seq_length > arch.longrope.original_max_position_embeddings:
        raise ValueError(
            f"packing with Transformer Engine (thd layout) and longrope at data.seq_length="
            f"{seq_length}: megatron picks the rope factors by the longest packed sample, the "
            f"padded run by seq_length (past the switch at "
            f"{arch.longrope.original_max_position_embeddings}); samples would get other factors "
            f"than unpacked. Use seq_length <= the switch, or the local spec (no TE)")


def packed_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] segment ids -> int32 cumulative lengths of the runs of equal ids in the flattened
    [B·S] sequence: every sample is one run, and so is each row's padding tail (TE attends within
    it; its outputs carry no loss). Starts at 0, ends at B·S."""
    flat = segment_ids.reshape(-1)
    b, s = segment_ids.shape
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a row starts a run even where the last one of the row before had its id
    bounds = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([b * s], device=flat.device, dtype=bounds.dtype)
    return torch.cat([bounds, end]).to(torch.int32)


def thd_packed_inputs(tokens, position_ids, segment_ids, labels=None):
    """The thd form of packed rows for Transformer Engine: tokens, positions (and labels)
    flattened to [1, B·S], and megatron-core's `PackedSeqParams` for them."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = packed_cu_seqlens(segment_ids)
    lengths = cu[1:] - cu[:-1]
    longest = int(lengths.max())
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
    )
    flat = [t.reshape(1, -1) if t is not None else None for t in (tokens, position_ids, labels)]
    return (*flat, params)

