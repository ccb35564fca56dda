"""`sequence_routing_js`: JS divergence between anchor priors and per-sequence mean routing softmax.

    sequence_routing_js(logits, segment_ids, prior, *, process_group=None) -> js
      logits       [L, T, N]  router logits of L aligned layers (fp32, bf16 or fp16), tokens in any
                              order or layout ([S, B] flattened, packed sequences, ...)
      segment_ids  [T] int    sequence 0..B-1 of each token; -1 = padding, ignored
      prior        [L, B, N]  anchor priors, fp32, rows sum to 1, exact zeros allowed; no gradient
      js           [L, B]     fp32 JS(prior ‖ mean softmax of the sequence), natural log

The single-layer form takes [T, N] logits and a [B, N] prior and returns [B]. A sequence without a
valid token gets JS 0 and no gradient; `return_counts=True` also returns each sequence's token
count, so the caller can tell those sequences apart (and average over the non-empty ones).

With `process_group`, a sequence's tokens may be split across the group's ranks (sequence or context
parallel): the per-sequence sums and counts are all-reduced before the divergence, every rank
returns the same js, and each rank's tokens receive exactly the single-rank gradient when each rank
backpropagates its own copy of the loss (forward all-reduce, backward identity).

Implementations: "triton" (the fused kernels of `routing_js_triton.py`: softmax in fp32, nothing of
size [L, T, N] saved for backward; on CPU tensors they run in Triton's interpreter) and "reference"
(`routing_js_reference.py`, plain PyTorch with autograd through its ops). "auto" picks triton for
GPU tensors and the reference for CPU tensors, unless TRITON_INTERPRET=1 asks for the kernels.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .routing_js_reference import check_routing_js_inputs, sequence_routing_js_reference

IMPLEMENTATIONS = ("auto", "triton", "reference")


class SequenceRoutingJS(NamedTuple):
    js: torch.Tensor  # [L, B] (or [B]) fp32
    token_counts: torch.Tensor  # [B] int64, valid tokens per sequence (over the process group)


class SequenceRoutingJSFunction(torch.autograd.Function):
    """The fused op on [L, T, N] logits; saves the logits, the ids and an [L, B, N] factor."""

    @staticmethod
    def forward(ctx, logits, segment_ids, prior, process_group, launch_config):
        from .routing_js_triton import routing_js_forward

        js, token_counts, grad_factor = routing_js_forward(
            logits, segment_ids, prior, process_group=process_group, config=launch_config
        )
        ctx.save_for_backward(logits, segment_ids, grad_factor)
        ctx.launch_config = launch_config
        ctx.mark_non_differentiable(token_counts)
        return js, token_counts

    @staticmethod
    def backward(ctx, grad_js, grad_token_counts):
        from .routing_js_triton import routing_js_backward

        # Grad mode is on in backward only under create_graph=True. The kernel's gradient carries
        # no graph, so a higher-order gradient would silently lose the JS term.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "sequence_routing_js: the Triton backward is not twice differentiable "
                "(create_graph=True); use impl='reference' for higher-order gradients"
            )

        logits, segment_ids, grad_factor = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = routing_js_backward(
                logits, segment_ids, grad_factor, grad_js, config=ctx.launch_config
            )
        return grad_logits, None, None, None, None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_implementation(impl: str, device: torch.device) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" or _interpreter_requested() else "reference"


def sequence_routing_js(
    logits: torch.Tensor,
    segment_ids: torch.Tensor,
    prior: torch.Tensor,
    *,
    process_group=None,
    return_counts: bool = False,
    validate: bool = True,
    impl: str = "auto",
    launch_config=None,
):
    """JS(prior ‖ mean routing softmax) per layer and sequence; see the module docstring.

    validate: check that segment ids lie in [-1, B) (one host synchronisation on a GPU). Shapes,
        dtypes and devices are always checked. Unvalidated ids outside [-1, B) are ignored.
    impl: "auto", "triton" or "reference".
    launch_config: a `routing_js_triton.LaunchConfig` overriding the default tiling (for tuning
        and for tests that need several tiles per program on small inputs).
    Returns js, or `SequenceRoutingJS(js, token_counts)` when `return_counts`.
    """
    check_routing_js_inputs(logits, segment_ids, prior, validate=validate)
    if resolve_implementation(impl, logits.device) == "reference":
        js, token_counts = sequence_routing_js_reference(
            logits, segment_ids, prior, process_group=process_group, return_counts=True,
            validate=False,
        )
        return SequenceRoutingJS(js, token_counts) if return_counts else js
    if logits.dtype == torch.float64:
        raise TypeError("the triton implementation takes float32, bfloat16 or float16 logits")

    single_layer = logits.dim() == 2
    if single_layer:
        logits, prior = logits.unsqueeze(0), prior.unsqueeze(0)
    js, token_counts = SequenceRoutingJSFunction.apply(
        logits, segment_ids, prior, process_group, launch_config
    )
    if single_layer:
        js = js.squeeze(0)
    if return_counts:
        return SequenceRoutingJS(js, token_counts.round().long())
    return js
