"""Kernel-vs-reference cases of `sequence_routing_js`: what a case is, its inputs, and the
comparison of the fused kernel with the float64-accumulating reference.

Shared by the kernel tests (`tests/routing_js_cases.py` holds their case list and runs them in a
process of its own) and `benchmarks/gpu_check.py` (its kernel-contract section), imported by name
from this folder as the other benchmark helpers are. Runs on any device; on CPU tensors the Triton
kernels need `TRITON_INTERPRET=1` set before triton is first imported.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class KernelCase:
    name: str
    layers: int
    tokens: int
    experts: int
    sequences: int
    dtype: str = "float32"
    layout: str = "sb"  # sb | packed | shuffled | all_padding
    logit_scale: float = 3.0
    prior_zeros: bool = True  # zero out a third of every prior row (random priors)
    # random | uniform | near_mean: the sequence's own mean routing, perturbed by 3% (JS ~1e-4,
    # the converged regime; `finalize_report` checks the finalize alone closer still)
    prior_kind: str = "random"
    dead_expert_offset: float = 0.0  # subtracted from expert 0's logits (a router's dead expert)
    strided_ids: bool = False  # segment ids as a stride-2 view
    # Kernel tiling override (block_t, tiles_per_program); None = the default for the size.
    tiling: tuple[int, int] | None = None
    split_chunk_paths: bool = False  # with a tiling: LaunchConfig.split_chunk_paths
    num_stages: int = 2  # with a tiling: LaunchConfig.num_stages (periodic chunks: 2 = prefetch)
    max_registers: int | None = None  # with a tiling: LaunchConfig.max_registers (compiled only)
    single_layer: bool = False
    id_dtype: str = "int64"
    token_major_logits: bool = False  # logits as a [T, L, N] buffer viewed as [L, T, N]
    js_rtol: float = 1e-5
    grad_rtol: float = 1e-5
    # Absolute floor per element, for cases whose exact gradient is ~0 (saturated softmax).
    grad_atol: float = 0.0


# Tokens are never a multiple of the block sizes (powers of two); every layout has padding and at
# least one sequence without a valid token.


def make_segment_ids(case: KernelCase, generator: torch.Generator) -> torch.Tensor:
    """Ids for `case.layout`; the last sequence never gets a token, the others have random lengths
    (some padding always remains)."""
    tokens, sequences = case.tokens, case.sequences
    if case.layout == "all_padding":
        return torch.full((tokens,), -1, dtype=torch.int64)
    if case.layout == "sb":
        # Megatron's [S, B] flattening: token s·B + b is position s of sequence b.
        positions = torch.arange(tokens) // sequences
        sequence_of_token = torch.arange(tokens) % sequences
        max_positions = math.ceil(tokens / sequences)
        lengths = torch.randint(1, max_positions, (sequences,), generator=generator)
        lengths[-1] = 0
        ids = torch.where(positions < lengths[sequence_of_token], sequence_of_token, -1)
        return ids
    # packed / shuffled: contiguous runs with padding runs between them.
    ids = torch.full((tokens,), -1, dtype=torch.int64)
    cuts = torch.sort(torch.randint(0, tokens, (2 * (sequences - 1),), generator=generator)).values
    for sequence in range(sequences - 1):
        start, stop = int(cuts[2 * sequence]), int(cuts[2 * sequence + 1])
        ids[start : max(stop, start + 1)] = sequence
    if case.layout == "shuffled":
        ids = ids[torch.randperm(tokens, generator=generator)]
    elif case.layout != "packed":
        raise ValueError(f"unknown layout {case.layout!r}")
    return ids


def make_inputs(case: KernelCase, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    if case.token_major_logits:
        logits = torch.randn(case.tokens, case.layers, case.experts, generator=generator)
        logits = logits.transpose(0, 1)
    else:
        logits = torch.randn(case.layers, case.tokens, case.experts, generator=generator)
    logits = case.logit_scale * logits
    logits[..., 0] -= case.dead_expert_offset
    logits = logits.to(device=device, dtype=dtype)
    prior = torch.softmax(torch.randn(case.layers, case.sequences, case.experts, generator=generator), -1)
    if case.prior_zeros and case.prior_kind == "random":
        zero_experts = torch.randperm(case.experts, generator=generator)[: case.experts // 3]
        prior[..., zero_experts] = 0.0
        prior = prior / prior.sum(-1, keepdim=True)
    segment_ids = make_segment_ids(case, generator)
    if case.prior_kind == "uniform":
        prior = torch.full_like(prior, 1.0 / case.experts)
    elif case.prior_kind == "near_mean":
        prior = _perturbed_sequence_means(logits.cpu(), segment_ids, prior, generator)
    elif case.prior_kind != "random":
        raise ValueError(f"unknown prior_kind {case.prior_kind!r}")
    segment_ids = segment_ids.to(device=device, dtype=getattr(torch, case.id_dtype))
    if case.strided_ids:
        segment_ids = torch.stack([segment_ids, torch.full_like(segment_ids, -7)], -1)[:, 0]
    upstream = torch.randn(case.layers, case.sequences, generator=generator).to(device)
    if case.single_layer:
        logits, prior, upstream = logits[0], prior[0], upstream[0]
    return logits, segment_ids, prior.to(device), upstream


def _perturbed_sequence_means(logits, segment_ids, fallback_prior, generator):
    """Each sequence's float64 mean routing softmax times (1 + 3% noise), renormalised; sequences
    without tokens keep their fallback prior."""
    probs = torch.softmax(logits.double(), -1)  # [L, T, N]
    prior = fallback_prior.double().clone()
    for sequence in range(prior.shape[1]):
        tokens = segment_ids == sequence
        if tokens.any():
            prior[:, sequence] = probs[:, tokens].mean(1)
    prior = prior * (1 + 0.03 * torch.randn(prior.shape, generator=generator, dtype=torch.float64))
    prior = prior.clamp_min(0)
    return (prior / prior.sum(-1, keepdim=True)).float()


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """‖test − reference‖₂ / ‖reference‖₂ (0 when both are 0)."""
    test, reference = test.double(), reference.double()
    scale = float(reference.norm())
    difference = float((test - reference).norm())
    return difference / scale if scale > 0 else difference


def run_case(case: KernelCase, device: torch.device) -> dict:
    """Kernel and reference on the same inputs; js, token counts and ∂(Σ w·js)/∂logits."""
    from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference

    logits, segment_ids, prior, upstream = make_inputs(case, device)
    results = {}
    launch = None
    if case.tiling is not None:
        from sara_megatron.kernels.routing_js_triton import LaunchConfig

        launch = LaunchConfig(
            *case.tiling, num_warps=4, num_stages=case.num_stages,
            split_chunk_paths=case.split_chunk_paths, max_registers=case.max_registers,
        )
    for impl in ("triton", "reference"):
        leaf = logits.detach().clone() if not case.token_major_logits else logits.detach()
        leaf.requires_grad_(True)
        if impl == "triton":
            js, counts = sequence_routing_js(
                leaf, segment_ids, prior, return_counts=True, impl="triton", launch_config=launch
            )
        else:
            js, counts = sequence_routing_js_reference(leaf, segment_ids, prior, return_counts=True)
        (grad,) = torch.autograd.grad((js * upstream).sum(), leaf)
        results[impl] = (js.detach(), counts, grad)

    (js, counts, grad), (ref_js, ref_counts, ref_grad) = results["triton"], results["reference"]
    num_sequences = prior.shape[-2]
    valid = (segment_ids >= 0).cpu()
    ref_js_scale = float(ref_js.abs().max()) if ref_js.numel() else 0.0
    js_error = float((js.double() - ref_js.double()).abs().max()) if js.numel() else 0.0
    grad_error_norm = float((grad.double() - ref_grad.double()).norm())
    grad_bound = case.grad_rtol * float(ref_grad.double().norm()) + case.grad_atol * math.sqrt(grad.numel())
    empty = (ref_counts == 0).cpu()
    return {
        "name": case.name,
        "js_dtype": str(js.dtype),
        "grad_dtype": str(grad.dtype),
        "js_shape": list(js.shape),
        "js_rel_error": js_error / ref_js_scale if ref_js_scale > 0 else js_error,
        "js_tolerance": case.js_rtol,
        "grad_rel_error": relative_error(grad, ref_grad),
        "grad_error_norm": grad_error_norm,
        "grad_error_bound": grad_bound,
        "grad_within_tolerance": grad_error_norm <= grad_bound,
        "counts_match": torch.equal(counts.cpu(), ref_counts.cpu()),
        "counts": counts.cpu().tolist(),
        "expected_counts": torch.bincount(
            segment_ids.cpu()[valid].long(), minlength=num_sequences
        ).tolist(),
        "all_finite": bool(torch.isfinite(js).all() and torch.isfinite(grad).all()),
        "empty_sequences": int(empty.sum()),
        "empty_js_all_zero": bool((js.cpu()[..., empty] == 0).all()),
        "padding_grad_all_zero": bool((grad.cpu()[..., ~valid, :] == 0).all()),
    }


def case_passes(result: dict) -> bool:
    return (
        result["js_rel_error"] <= result["js_tolerance"]
        and result["grad_within_tolerance"]
        and result["counts_match"]
        and result["counts"] == result["expected_counts"]
        and result["all_finite"]
        and result["empty_js_all_zero"]
        and result["padding_grad_all_zero"]
    )
