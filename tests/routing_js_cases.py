"""Kernel-vs-reference cases for `sequence_routing_js`, runnable on any device.

    TRITON_INTERPRET=1 python tests/routing_js_cases.py --json results.json    # CPU, interpreter
    python tests/routing_js_cases.py --device cuda                             # a GPU

Triton picks its interpreter when it is first imported, so on CPU these cases run in a process of
their own (tests/test_routing_js.py starts one); the tests assert on the JSON this writes. Run by hand
it also prints a table and exits non-zero when a case is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# The case type, its inputs and the kernel-vs-reference comparison live beside the benchmark
# helpers (benchmarks/gpu_check.py runs some of these cases too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from routing_js_contract import (  # noqa: E402,F401 - re-exported for tests/test_routing_js.py
    KernelCase,
    case_passes,
    make_inputs,
    make_segment_ids,
    relative_error,
    run_case,
)


CASES = [
    KernelCase("fp32_n16_sb", 2, 77, 16, 5),
    KernelCase("fp32_n60_packed", 2, 93, 60, 6, layout="packed"),
    KernelCase("fp32_n128_sb_block16", 3, 101, 128, 4, tiling=(16, 1)),
    # Several tiles per program, chunks straddling sequence boundaries.
    KernelCase("fp32_n60_packed_multitile", 2, 300, 60, 7, layout="packed", tiling=(16, 4)),
    # [S, B] with B = 4 dividing the tile: chunks repeat their first tile's ids (periodic path).
    KernelCase("fp32_n128_sb_periodic_multitile", 2, 517, 128, 4, tiling=(16, 4)),
    # B = 20 interleaved: chunks span more ids than one segment-sum window -> tile-wise windows.
    KernelCase("fp32_n16_sb_wide_multitile", 2, 203, 16, 20, tiling=(32, 2)),
    # Periodic and other chunks summed by separate launches: long packed sequences give both
    # (chunks inside a sequence, chunks straddling a boundary), [S, B] only periodic ones.
    KernelCase("fp32_n60_packed_long_multitile_split", 2, 700, 60, 4, layout="packed",
               tiling=(16, 4), split_chunk_paths=True),
    KernelCase("fp32_n128_sb_periodic_multitile_split", 2, 517, 128, 4, tiling=(16, 4),
               split_chunk_paths=True),
    # Registers capped for ptxas (ignored by the interpreter; on a GPU, the capped build).
    KernelCase("fp32_n128_sb_periodic_multitile_split_capped", 2, 517, 128, 4, tiling=(16, 4),
               split_chunk_paths=True, max_registers=64),
    # One stage: periodic chunks load each tile when they reach it, without the prefetch.
    KernelCase("fp32_n128_sb_periodic_multitile_stages1", 2, 517, 128, 4, tiling=(16, 4),
               num_stages=1),
    # Tiles per program not a power of two: periodic and other chunks, one launch and split.
    KernelCase("fp32_n60_packed_long_tiles3", 2, 700, 60, 4, layout="packed", tiling=(16, 3)),
    KernelCase("fp32_n128_sb_tiles3_split", 2, 517, 128, 4, tiling=(16, 3), split_chunk_paths=True),
    KernelCase("fp32_n256_packed", 2, 45, 256, 3, layout="packed"),
    # B = 40 in random order: tiles span more ids than MAX_SEGMENTS_PER_TILE -> per-token atomics.
    KernelCase("fp32_n128_shuffled_wide", 2, 150, 128, 40, layout="shuffled", tiling=(64, 1)),
    # B = 150 in random order: a tile's ids span more than MAX_SEGMENT_SPAN -> per-token atomics.
    KernelCase("fp32_n60_shuffled_very_wide", 2, 230, 60, 150, layout="shuffled", tiling=(128, 1)),
    KernelCase("fp32_n60_shuffled_narrow", 2, 61, 60, 3, layout="shuffled", tiling=(16, 2)),
    KernelCase("fp32_n60_shuffled_narrow_split", 2, 61, 60, 3, layout="shuffled", tiling=(16, 2),
               split_chunk_paths=True),
    KernelCase("fp32_n16_int32_ids", 2, 50, 16, 4, id_dtype="int32"),
    KernelCase("fp32_n60_single_layer", 1, 70, 60, 4, single_layer=True),
    KernelCase("fp32_n128_token_major", 3, 39, 128, 3, token_major_logits=True),
    KernelCase("fp32_all_padding", 2, 33, 60, 3, layout="all_padding"),
    KernelCase("fp32_n128_extreme", 2, 67, 128, 4, logit_scale=1e4, grad_atol=1e-9),
    KernelCase("fp32_n16_no_prior_zeros", 2, 40, 16, 2, prior_zeros=False),
    # A mean 2^25 times below the prior (or above it) once rounded d = (P − Q)/(P + Q) to ±1.
    KernelCase("fp32_n64_dead_expert_uniform_prior", 2, 128, 64, 3, dead_expert_offset=25.0,
               prior_kind="uniform"),
    KernelCase("fp32_n128_near_mean_prior", 2, 150, 128, 3, prior_kind="near_mean"),
    # Row maxima on both sides of 2^29, where the softmax switches from base e to base 2.
    KernelCase("fp32_n128_huge_logits", 2, 67, 128, 4, logit_scale=3e8, grad_atol=1e-9),
    KernelCase("bf16_n60_huge_logits", 2, 67, 60, 4, dtype="bfloat16", logit_scale=1e10,
               js_rtol=2e-3, grad_rtol=2e-3, grad_atol=1e-9),
    KernelCase("fp32_n60_strided_ids", 2, 83, 60, 4, layout="packed", strided_ids=True),
    KernelCase("bf16_n16_sb", 2, 77, 16, 5, dtype="bfloat16", js_rtol=2e-3, grad_rtol=2e-3),
    KernelCase("bf16_n60_packed", 2, 93, 60, 6, dtype="bfloat16", layout="packed", js_rtol=2e-3,
               grad_rtol=2e-3),
    KernelCase("bf16_n128_sb", 3, 130, 128, 4, dtype="bfloat16", js_rtol=2e-3, grad_rtol=2e-3),
    KernelCase("bf16_n128_packed_multitile", 2, 250, 128, 3, dtype="bfloat16", layout="packed",
               tiling=(32, 4), js_rtol=2e-3, grad_rtol=2e-3),
    KernelCase("bf16_n128_packed_multitile_split", 2, 250, 128, 3, dtype="bfloat16",
               layout="packed", tiling=(32, 4), split_chunk_paths=True, js_rtol=2e-3,
               grad_rtol=2e-3),
    KernelCase("bf16_n128_sb_periodic_multitile_split", 2, 517, 128, 4, dtype="bfloat16",
               tiling=(32, 4), split_chunk_paths=True, js_rtol=2e-3, grad_rtol=2e-3),
    KernelCase("bf16_n256_shuffled", 2, 45, 256, 3, dtype="bfloat16", layout="shuffled",
               js_rtol=2e-3, grad_rtol=2e-3),
    KernelCase("bf16_n128_extreme", 2, 67, 128, 4, dtype="bfloat16", logit_scale=1e4,
               js_rtol=2e-3, grad_rtol=2e-3, grad_atol=1e-9),
    KernelCase("fp16_n60_sb", 2, 55, 60, 3, dtype="float16", js_rtol=2e-3, grad_rtol=2e-3),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def saved_tensor_report(device: torch.device) -> dict:
    """What each implementation keeps for backward, recorded by saved_tensors_hooks."""
    from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference

    case = KernelCase("saved", 3, 97, 64, 4, dtype="bfloat16")
    logits, segment_ids, prior, _ = make_inputs(case, device)
    logits.requires_grad_(True)
    report = {"logits_numel": logits.numel(), "layers_sequences_experts": 3 * 4 * 64,
              "tokens": case.tokens}
    for impl in ("triton", "reference"):
        saved = []

        def pack(tensor):
            saved.append({
                "shape": list(tensor.shape),
                "numel": tensor.numel(),
                "dtype": str(tensor.dtype),
                "is_logits": tensor.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr(),
            })
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if impl == "triton":
                js = sequence_routing_js(logits, segment_ids, prior, impl="triton")
            else:
                js = sequence_routing_js_reference(logits, segment_ids, prior)
        torch.autograd.grad(js.sum(), logits)
        report[impl] = saved
    return report


def split_chunk_paths_report(device: torch.device) -> dict:
    """Sums and counts of each launch of a split forward, alone and together, beside the one
    launch's: on packed ids some chunks are periodic (inside a sequence) and some not."""
    from sara_megatron.kernels.routing_js_triton import LaunchConfig, accumulate_launches

    case = CASES_BY_NAME["fp32_n60_packed_long_multitile_split"]
    logits, segment_ids, prior, _ = make_inputs(case, device)
    num_sums = prior.numel()

    def accumulate(split: bool, keep: slice) -> tuple[torch.Tensor, int]:
        """Stats after running the `keep` launches, and how many launches there were."""
        stats = torch.zeros(num_sums + case.sequences, device=device)
        config = LaunchConfig(*case.tiling, num_warps=4, num_stages=2, split_chunk_paths=split)
        launches = accumulate_launches(
            logits, segment_ids, stats[:num_sums], stats[num_sums:], case.sequences, config
        )
        for launch in launches[keep]:
            launch.run()
        return stats, len(launches)

    one_launch, num_unsplit = accumulate(False, slice(None))
    both, num_split = accumulate(True, slice(None))
    (periodic, _), (other, _) = accumulate(True, slice(0, 1)), accumulate(True, slice(1, 2))
    return {
        "launches": [num_unsplit, num_split],
        "periodic_counts": periodic[num_sums:].tolist(),
        "other_counts": other[num_sums:].tolist(),
        "one_launch_counts": one_launch[num_sums:].tolist(),
        "split_vs_one_launch": relative_error(both, one_launch),
        "parts_vs_split": relative_error(periodic + other, both),
    }


def finalize_report(device: torch.device) -> dict:
    """The finalize alone against float64, on exact fp32 means: relative JS error for priors
    within 0.1%, 1% and 10% of the mean (summing KL(P‖M) and KL(Q‖M) apart would leave
    ~eps/|P − Q| of it), and whether a mean or prior 1e-12 or 1e-39 (subnormal) of the other side
    keeps js and the gradient factor finite."""
    from sara_megatron.kernels.routing_js_reference import js_divergence_from_mean
    from sara_megatron.kernels.routing_js_triton import divergence_from_sums

    generator = torch.Generator().manual_seed(0)
    rows, experts = 64, 128
    report = {}
    for spread in (1e-3, 1e-2, 1e-1):
        mean = torch.softmax(2 * torch.randn(rows, experts, generator=generator), -1)
        noise = torch.randn(rows, experts, generator=generator)
        prior = (mean * (1 + spread * noise)).clamp_min(0)
        prior = prior / prior.sum(-1, keepdim=True)
        js, grad_factor = divergence_from_sums(
            mean.reshape(-1).to(device), torch.ones(rows, device=device), prior[None].to(device)
        )
        exact = js_divergence_from_mean(prior.double(), mean.double(), torch.ones(rows))
        midpoint = 0.5 * (prior.double() + mean.double())
        exact_factor = 0.5 * torch.log(mean.double() / midpoint)
        report[f"js_rel_error_{spread:g}"] = float(((js[0].cpu().double() - exact) / exact).abs().max())
        report[f"grad_factor_rel_error_{spread:g}"] = relative_error(grad_factor[0].cpu(), exact_factor)
    mean = torch.softmax(torch.randn(rows, experts, generator=generator), -1)
    prior = torch.full((rows, experts), 1.0 / experts)
    mean[:, 0], mean[:, 1], prior[:, 2], prior[:, 3] = 1e-12, 1e-39, 1e-12, 1e-39
    js, grad_factor = divergence_from_sums(
        mean.reshape(-1).to(device), torch.ones(rows, device=device), prior[None].to(device)
    )
    exact = js_divergence_from_mean(prior.double(), mean.double(), torch.ones(rows))
    report["lopsided_finite"] = bool(torch.isfinite(js).all() and torch.isfinite(grad_factor).all())
    report["lopsided_js_rel_error"] = float(((js[0].cpu().double() - exact) / exact).abs().max())
    return report


def contract_report(device: torch.device) -> dict:
    """Kernel behaviour at the contract's edges: unvalidated int64 ids beyond int32, no layers,
    and a double backward (which must refuse rather than drop the JS term)."""
    from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference

    logits, segment_ids, prior, _ = make_inputs(CASES_BY_NAME["fp32_n16_sb"], device)
    wild = segment_ids.clone()
    wild[:4] = torch.tensor([2**32, 2**32 + 1, -5, 2**40])
    js, counts = sequence_routing_js(
        logits, wild, prior, validate=False, impl="triton", return_counts=True
    )
    ref_js, ref_counts = sequence_routing_js_reference(
        logits, wild, prior, validate=False, return_counts=True
    )
    no_layers = sequence_routing_js(
        logits[:0], segment_ids, prior[:0], impl="triton", return_counts=True
    )
    leaf = logits.detach().clone().requires_grad_(True)
    js_of_leaf = sequence_routing_js(leaf, segment_ids, prior, impl="triton").sum()
    try:
        torch.autograd.grad(js_of_leaf, leaf, create_graph=True)
        double_backward = "ran"
    except RuntimeError as error:
        double_backward = str(error)
    return {
        "wide_ids_js_rel_error": relative_error(js, ref_js),
        "wide_ids_counts": counts.cpu().tolist(),
        "wide_ids_expected_counts": ref_counts.cpu().tolist(),
        "no_layers_js_shape": list(no_layers.js.shape),
        "no_layers_counts": no_layers.token_counts.cpu().tolist(),
        "expected_counts": torch.bincount(
            segment_ids.cpu()[segment_ids.cpu() >= 0].long(), minlength=prior.shape[1]
        ).tolist(),
        "double_backward": double_backward,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--json", help="write {'cases': [...], 'saved_tensors': {...}, 'split_chunk_paths': {...}, "
        "'finalize': {...}, 'contract': {...}} here"
    )
    parser.add_argument("--cases", nargs="*", default=list(CASES_BY_NAME), choices=list(CASES_BY_NAME))
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    results = [run_case(CASES_BY_NAME[name], device) for name in args.cases]
    payload = {"cases": results, "saved_tensors": saved_tensor_report(device),
               "split_chunk_paths": split_chunk_paths_report(device),
               "finalize": finalize_report(device), "contract": contract_report(device)}
    failed = 0
    for result in results:
        ok = case_passes(result)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {result['name']:<28} js {result['js_rel_error']:.2e} "
              f"grad {result['grad_rel_error']:.2e} (bound ok: {result['grad_within_tolerance']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
