"""Collectives with the backward a loss over split statistics needs.

`all_reduce_identity_backward`, a sum over a process group in forward and identity in backward:
for a loss computed from statistics summed over the ranks that split a sequence's tokens (TP×CP)
or a token's experts (TP×EP): every rank computes the same loss from the summed value and
backpropagates its own copy, so the gradient reaching a rank's partial sum is already the whole
gradient (Megatron's `reduce_from_tensor_model_parallel_region` pattern).

`gather_rows`, every rank's rows in rank order: for a loss on one rank that reads the rows of
all (contrastive negatives over data parallel), the backward sends each rank the gradients every
rank's loss gives its rows."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_identity_backward(tensor: torch.Tensor, group) -> torch.Tensor:
    """The sum of `tensor` over `group`; its gradient passes back unchanged.

    Args:
        tensor: this rank's partial sum (not modified).
        group: the process group to sum over.
    """
    return _AllReduceIdentityBackward.apply(tensor, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, group, counts):
        padded = rows.new_zeros(max(counts), *rows.shape[1:])
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group = group
        ctx.offset = sum(counts[:dist.get_rank(group)])
        ctx.count = rows.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.count], None, None


def gather_rows(rows: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated in rank order (ranks may hold different numbers of rows),
    differentiable: the gradient reaching this rank's rows is the sum over the group of the
    gradients every rank's loss sends them. Collective, and again in the backward when `rows`
    needs a gradient.

    Args:
        rows: [n_r, ...] this rank's rows.
        group: the process group; None is one rank alone.

    Returns:
        ([Σ n_r, ...] the rows of every rank, the offset of this rank's rows in them).
    """
    if group is None or dist.get_world_size(group) == 1:
        return rows, 0
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    return _GatherRows.apply(rows, group, counts), sum(counts[:dist.get_rank(group)])
