"""The model side of sequence packing: attention within each sample, positions from 0 per sample.

A packed row holds several samples (segment ids, -1 = padding; `data/packing.py`). Two layouts:
bshd for the local spec (rows stay [B, S]; a block-diagonal causal mask, `packed_attention_mask`,
and per-token RoPE positions, `packed_rope`; under context parallel the whole row's mask is cut
by `ContextParallelDotProductAttention`), and thd for Transformer Engine (rows flattened to
[1, B·S] with megatron-core's `PackedSeqParams`, `thd_packed_inputs`). Phi-3.5 longrope picks its
factors by the rotary length, which under thd is the longest sample's: refused where that can
differ from the padded run (`check_packing_supported`; docs/packing.md).
"""

from __future__ import annotations

import contextlib
import torch


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask of packed rows: a token sees the earlier tokens of its own
    sample. Padding (-1) sees earlier padding only, so no softmax row is empty.

    Args:
        segment_ids: [B, S] sample index of each token, -1 = padding.

    Returns:
        [B, 1, S, S] bool, True = masked out (megatron's convention).

    Raises:
        ValueError: `segment_ids` is not two-dimensional.
    """
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
    unfused RoPE broadcasts over heads (the fused one takes [S, 1, 1, D] only: refused).

    Args:
        model: the model about to be called (a GPTModel, or wrapped); a model without RoPE is
            left alone.
        position_ids: [B, S_local] each token's position within its own sample.

    Raises:
        NotImplementedError: the model uses the fused RoPE.
        ValueError: (in the forward) a position beyond the rotary table.
    """
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
    """Refuse what packing cannot do the same as the padded run (see the module docstring).

    Args:
        arch: the model architecture (its longrope switch).
        seq_length: the length rows are packed into (`data.seq_length`).
        use_te: whether the model uses Transformer Engine (thd layout).
        context_parallel: the context-parallel size.

    Raises:
        NotImplementedError: Transformer Engine with context parallel.
        ValueError: Transformer Engine with longrope and `seq_length` past the switch.
    """
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
    it; its outputs carry no loss).

    Args:
        segment_ids: [B, S] segment ids of packed rows.

    Returns:
        [runs + 1] int32 cumulative lengths, from 0 to B·S.
    """
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
    flattened to [1, B·S], and megatron-core's `PackedSeqParams` for them.

    Args:
        tokens: [B, S] token ids.
        position_ids: [B, S] per-sample positions.
        segment_ids: [B, S] segment ids (the runs `packed_cu_seqlens` cuts).
        labels: [B, S] labels, or None.

    Returns:
        (tokens, positions, labels or None, each [1, B·S]; `PackedSeqParams` in thd format).
    """
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

