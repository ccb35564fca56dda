"""Plain PyTorch reference for the sequence routing Jensen–Shannon divergence.

Same contract as `sequence_routing_js` (see `routing_js.py`), written as the straightforward graph:
an fp32 softmax over all experts, segment sums with `index_add_`, the divergence, autograd through
every op. It is the oracle the Triton kernels are tested against, the CPU path, and the "eager"
baseline of `benchmarks/bench_routing_js.py`. It keeps an fp32 [L, T, N] probability tensor for
backward; the fused op does not.

Beside the paper's JS it computes the divergence variants of docs/objectives.md
(`divergence="kl"`, `"js_entropy_normalised"`); those run only here, the fused kernels compute JS.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SEGMENT_ID_DTYPES = (torch.int32, torch.int64)


def check_routing_js_inputs(
    logits: torch.Tensor, segment_ids: torch.Tensor, prior: torch.Tensor, *, validate: bool
) -> None:
    """Shape, dtype and device checks shared by every implementation.

    `validate` also checks that every segment id lies in [-1, B); on a GPU that costs one host
    synchronisation, so callers that build the ids on the host may check them there instead.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [T, N] or [L, T, N], got shape {tuple(logits.shape)}")
    if prior.dim() != logits.dim():
        raise ValueError(
            f"prior must be {'[B, N]' if logits.dim() == 2 else '[L, B, N]'} to match logits of shape "
            f"{tuple(logits.shape)}, got shape {tuple(prior.shape)}"
        )
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not prior.is_floating_point():
        raise TypeError(f"prior must be a floating-point tensor (float32), got {prior.dtype}")
    if segment_ids.dtype not in _SEGMENT_ID_DTYPES:
        raise TypeError(f"segment_ids must be int32 or int64, got {segment_ids.dtype}")
    num_tokens, num_experts = logits.shape[-2], logits.shape[-1]
    if segment_ids.shape != (num_tokens,):
        raise ValueError(
            f"segment_ids must be [T] = [{num_tokens}] (one id per token of logits), "
            f"got shape {tuple(segment_ids.shape)}"
        )
    if prior.shape[-1] != num_experts:
        raise ValueError(f"prior has {prior.shape[-1]} experts, logits have {num_experts}")
    if logits.dim() == 3 and prior.shape[0] != logits.shape[0]:
        raise ValueError(f"prior has {prior.shape[0]} layers, logits have {logits.shape[0]}")
    if num_experts == 0:
        raise ValueError("logits have zero experts; the softmax is undefined")
    if not (logits.device == segment_ids.device == prior.device):
        raise ValueError(
            f"logits ({logits.device}), segment_ids ({segment_ids.device}) and prior "
            f"({prior.device}) must be on one device"
        )
    if prior.requires_grad:
        raise ValueError("prior is a fixed anchor and receives no gradient; pass prior.detach()")
    if validate and segment_ids.numel() > 0:
        num_sequences = prior.shape[-2]
        lowest, highest = torch.aminmax(segment_ids)
        lowest, highest = int(lowest), int(highest)
        if lowest < -1 or highest >= num_sequences:
            raise ValueError(
                f"segment_ids must lie in [-1, {num_sequences}) (B = prior.shape[-2], -1 = padding), "
                f"got values in [{lowest}, {highest}]"
            )


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum over a process group in forward, identity in backward.

    The divergence computed from the summed statistics is replicated on every rank and each rank
    backpropagates its own copy, so the gradient reaching a rank's partial sum is already the full
    gradient (Megatron's `reduce_from_tensor_model_parallel_region`).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, process_group) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=process_group)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def js_divergence_from_mean(
    prior: torch.Tensor, sequence_mean: torch.Tensor, token_counts: torch.Tensor
) -> torch.Tensor:
    """JS(prior ‖ mean) over the last dim, natural log, 0·log0 = 0; 0 where a sequence is empty.

    Computed in float64 (the tensors are O(L·B·N), so this is free) so that rounding in the logs
    does not swamp the divergence of two near-equal distributions. Every log is taken of a safe
    operand so that masked-out entries give no NaN in backward either.
    """
    prior = prior.double()
    sequence_mean = sequence_mean.double()
    midpoint = 0.5 * (prior + sequence_mean)
    safe_midpoint = torch.where(midpoint > 0, midpoint, torch.ones_like(midpoint))

    def kl_to_midpoint(dist_: torch.Tensor) -> torch.Tensor:
        positive = dist_ > 0
        safe = torch.where(positive, dist_, torch.ones_like(dist_))
        return torch.where(positive, dist_ * torch.log(safe / safe_midpoint), 0.0).sum(-1)

    js = 0.5 * kl_to_midpoint(prior) + 0.5 * kl_to_midpoint(sequence_mean)
    return torch.where(token_counts > 0, js, 0.0)


DIVERGENCES = ("js", "kl", "js_entropy_normalised")


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x where x > 0, 0 elsewhere, with a finite gradient everywhere."""
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)))


def kl_divergence_from_mean(
    prior: torch.Tensor, sequence_mean: torch.Tensor, token_counts: torch.Tensor
) -> torch.Tensor:
    """KL(prior ‖ mean) over the last dim in float64, natural log, 0·log0 = 0; 0 where a
    sequence is empty. The mean of a softmax has no exact zero unless it underflows; such an
    entry is floored at the smallest normal float64 so the value stays finite (and large)."""
    prior = prior.double()
    sequence_mean = sequence_mean.double().clamp_min(torch.finfo(torch.float64).tiny)
    kl = torch.where(prior > 0, prior * (_safe_log(prior) - torch.log(sequence_mean)), 0.0).sum(-1)
    return torch.where(token_counts > 0, kl, 0.0)


def entropy(dist_: torch.Tensor) -> torch.Tensor:
    """H(dist) = -Σ p log p over the last dim, 0·log0 = 0."""
    return -torch.where(dist_ > 0, dist_ * _safe_log(dist_), 0.0).sum(-1)


def entropy_normalised_js_from_mean(
    prior: torch.Tensor, sequence_mean: torch.Tensor, token_counts: torch.Tensor
) -> torch.Tensor:
    """JS(prior ‖ mean) / (½(H(prior) + H(mean))), in float64: the divergence in units of how
    spread the two routing profiles are, so layers with near-uniform routing (large entropy) and
    layers with peaked routing weigh alike. The denominator is floored at 1e-12 (two one-hot
    profiles); 0 where a sequence is empty."""
    js = js_divergence_from_mean(prior, sequence_mean, token_counts)
    mean_entropy = 0.5 * (entropy(prior.double()) + entropy(sequence_mean.double()))
    return torch.where(token_counts > 0, js / mean_entropy.clamp_min(1e-12), 0.0)


_DIVERGENCE_FUNCTIONS = {
    "js": js_divergence_from_mean,
    "kl": kl_divergence_from_mean,
    "js_entropy_normalised": entropy_normalised_js_from_mean,
}


def divergence_from_mean(prior, sequence_mean, token_counts, divergence: str = "js"):
    """The named divergence of prior and mean routing (see `DIVERGENCES`)."""
    if divergence not in _DIVERGENCE_FUNCTIONS:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    return _DIVERGENCE_FUNCTIONS[divergence](prior, sequence_mean, token_counts)


def sequence_routing_js_reference(
    logits: torch.Tensor,
    segment_ids: torch.Tensor,
    prior: torch.Tensor,
    *,
    process_group=None,
    return_counts: bool = False,
    validate: bool = True,
    divergence: str = "js",
):
    """Reference `sequence_routing_js`: returns js [L, B] (or [B]) fp32, and the token counts [B]
    int64 when `return_counts`. Float64 logits stay float64 (for `gradcheck`).

    divergence: "js" (the paper's), "kl" (KL(prior ‖ mean)) or "js_entropy_normalised" (JS over
    the mean entropy of the two profiles); only "js" has a fused Triton kernel."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    check_routing_js_inputs(logits, segment_ids, prior, validate=validate)
    single_layer = logits.dim() == 2
    if single_layer:
        logits, prior = logits.unsqueeze(0), prior.unsqueeze(0)
    num_layers, _, num_experts = logits.shape
    num_sequences = prior.shape[1]
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    probs = torch.softmax(logits.to(compute_dtype), dim=-1)
    # Padding (and ids the caller chose not to validate) goes to an extra bucket that is dropped:
    # no boolean indexing, so no host synchronisation on a GPU.
    valid = (segment_ids >= 0) & (segment_ids < num_sequences)
    bucket = torch.where(valid, segment_ids, num_sequences).long()
    sums = probs.new_zeros(num_layers, num_sequences + 1, num_experts).index_add(1, bucket, probs)
    counts = probs.new_zeros(num_sequences + 1).index_add(0, bucket, valid.to(compute_dtype))
    sums, counts = sums[:, :num_sequences], counts[:num_sequences]
    if process_group is not None:
        sums = _AllReduceSumIdentityBackward.apply(sums, process_group)
        counts = _AllReduceSumIdentityBackward.apply(counts, process_group)

    mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
    js = divergence_from_mean(prior, mean, counts, divergence)
    js = js.to(compute_dtype if compute_dtype == torch.float64 else torch.float32)
    if single_layer:
        js = js.squeeze(0)
    if return_counts:
        return js, counts.detach().round().long()
    return js
