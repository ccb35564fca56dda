"""Sum over a process group in forward, identity in backward.

For a loss computed from statistics summed over the ranks that split a sequence's tokens (TP×CP)
or a token's experts (TP×EP): every rank computes the same loss from the summed value and
backpropagates its own copy, so the gradient reaching a rank's partial sum is already the whole
gradient (Megatron's `reduce_from_tensor_model_parallel_region` pattern)."""

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
