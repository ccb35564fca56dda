"""Benchmark `sequence_routing_js` in isolation: fused Triton kernels vs eager PyTorch vs torch.compile.

    python benchmarks/bench_routing_js.py --json routing_js_bench.json

The eager graph is `sequence_routing_js_reference` (fp32 softmax, index_add_ segment sums, the
divergence, autograd through it); "compile" is torch.compile of that same function. Each shape is
timed for forward and forward+backward (backward = the difference; the loss is js.mean()), with
peak memory above the inputs and the bytes each implementation saves for backward.

On a GPU the times are kernel times: the sum of the durations of the kernels one call launches,
from the profiler, with the L2 cache flushed before every call — no CPU launch overhead, as in a
training step where the CPU runs ahead. The column `launch_ms` is the other view: forward+backward
called from Python (triton.testing.do_bench), CPU launch overhead and idle gaps included.
Achieved bandwidth counts the bytes the op cannot avoid: the logits read in forward, read again in
backward, and the gradient written once (3 × L·T·N × element size), against the device's nominal
peak (`%peak`) and against a measured device-to-device copy (`%copy`).

On a machine without a GPU it times the reference and its compiled form on CPU and the Triton kernels
in the interpreter at small shapes only; those timings are CPU timings and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# The kernels run on CPU tensors only in Triton's interpreter, which must be chosen before triton is
# first imported (see kernels/routing_js_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference  # noqa: E402
from routing_js_benchmarking import (  # noqa: E402
    BENCHMARK_SHAPES,
    NOMINAL_PEAK_BANDWIDTH,
    benchmark_inputs,
    kernel_time_ms,
    relative_error,
)

# (layers, sequences, tokens per sequence, experts, dtype)
NAMED_SHAPES = {
    name: (*dims, getattr(torch, dtype)) for name, (*dims, dtype) in BENCHMARK_SHAPES.items()
}
CPU_INTERPRETER_SHAPE = (2, 4, 64, 128, torch.bfloat16)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def implementations(segment_ids, prior, include_fused: bool):
    """name -> function(logits) -> js; the same contract, validation off for all of them."""

    def fused(logits):
        return sequence_routing_js(logits, segment_ids, prior, validate=False, impl="triton")

    def eager(logits):
        return sequence_routing_js_reference(logits, segment_ids, prior, validate=False)

    compiled = torch.compile(eager, dynamic=False)
    impls = {"eager": eager, "compile": compiled}
    return {"fused": fused, **impls} if include_fused else impls


def _forward(fn, logits):
    return lambda: fn(logits)


def _forward_backward(fn, logits):
    def run():
        js = fn(logits)
        return torch.autograd.grad(js.mean(), logits)

    return run


def launch_bound_ms(run, device, reps: int) -> float:
    """Median milliseconds of calling `run` from Python: on a GPU this includes every launch's CPU
    overhead (do_bench, L2 flushed between calls); on CPU it is the plain wall time."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=10, rep=reps * 10, return_mode="median"))
    run()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_memory_mb(run, device) -> float | None:
    """Peak allocated memory above what was allocated before `run` (inputs excluded)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def saved_for_backward_mb(fn, logits) -> float:
    """Bytes the op keeps for backward, not counting the logits themselves (which are alive anyway)."""
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        js = fn(logits)
    del js
    return sum(saved.values()) / 2**20


def measured_copy_bandwidth(device) -> float | None:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    if device.type != "cuda":
        return None
    import triton.testing

    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=10, rep=100, return_mode="median")
    return 2 * source.numel() * 4 / (ms * 1e-3)


def bench_shape(name, shape, layout, device, reps, nominal_bw, copy_bw, include_fused):
    layers, sequences, tokens_per_sequence, experts, dtype = shape
    logits, segment_ids, prior = benchmark_inputs(
        layers, sequences, tokens_per_sequence, experts, dtype, layout, device
    )
    logits.requires_grad_()
    num_tokens = sequences * tokens_per_sequence
    essential_bytes = 3 * logits.numel() * logits.element_size()
    rows = []
    reference_js, reference_grad = None, None
    for impl_name, fn in implementations(segment_ids, prior, include_fused).items():
        js = fn(logits)
        (grad,) = torch.autograd.grad(js.mean(), logits)
        if reference_js is None:
            reference_js, reference_grad = sequence_routing_js_reference(
                logits, segment_ids, prior, validate=False
            ), None
            (reference_grad,) = torch.autograd.grad(reference_js.mean(), logits)
        kernels = None
        if device.type == "cuda":
            forward_ms, _ = kernel_time_ms(_forward(fn, logits), reps)
            forward_backward_ms, kernels = kernel_time_ms(_forward_backward(fn, logits), reps)
        else:
            forward_ms = launch_bound_ms(_forward(fn, logits), device, reps)
            forward_backward_ms = launch_bound_ms(_forward_backward(fn, logits), device, reps)
        row = {
            "shape": name,
            "layout": layout,
            "impl": impl_name,
            "L": layers,
            "T": num_tokens,
            "N": experts,
            "dtype": str(dtype).removeprefix("torch."),
            "logits_MB": logits.numel() * logits.element_size() / 2**20,
            "fwd_ms": forward_ms,
            "bwd_ms": forward_backward_ms - forward_ms,
            "fwd_bwd_ms": forward_backward_ms,
            "launch_fwd_bwd_ms": (
                launch_bound_ms(_forward_backward(fn, logits), device, reps)
                if device.type == "cuda" else None
            ),
            "peak_MB": peak_memory_mb(_forward_backward(fn, logits), device),
            "saved_MB": saved_for_backward_mb(fn, logits),
            "GBps": essential_bytes / (forward_backward_ms * 1e-3) / 1e9,
            "js_rel_err": relative_error(js.detach(), reference_js.detach()),
            "grad_rel_err": relative_error(grad, reference_grad),
            "fwd_bwd_kernels_ms": kernels,
        }
        if nominal_bw:
            row["pct_nominal_bw"] = 100 * essential_bytes / (forward_backward_ms * 1e-3) / nominal_bw
        if copy_bw:
            row["pct_copy_bw"] = 100 * essential_bytes / (forward_backward_ms * 1e-3) / copy_bw
        rows.append(row)
    fused = next((row for row in rows if row["impl"] == "fused"), None)
    for row in rows:
        row["fused_speedup"] = (row["fwd_bwd_ms"] / fused["fwd_bwd_ms"]) if fused else None
    return rows


def format_table(rows) -> str:
    columns = [
        ("shape", "{:<12}"), ("layout", "{:<6}"), ("impl", "{:<7}"), ("L", "{:>3}"), ("T", "{:>6}"),
        ("N", "{:>4}"), ("dtype", "{:<8}"), ("fwd_ms", "{:>8.3f}"), ("bwd_ms", "{:>8.3f}"),
        ("fwd_bwd_ms", "{:>10.3f}"), ("launch_fwd_bwd_ms", "{:>10.3f}"), ("peak_MB", "{:>8.1f}"), ("saved_MB", "{:>8.1f}"),
        ("GBps", "{:>7.0f}"), ("pct_nominal_bw", "{:>6.1f}"), ("pct_copy_bw", "{:>6.1f}"),
        ("fused_speedup", "{:>7.2f}"), ("grad_rel_err", "{:>9.1e}"),
    ]
    headers = {"launch_fwd_bwd_ms": "launch_ms", "pct_nominal_bw": "%peak", "pct_copy_bw": "%copy", "fused_speedup": "fused×",
               "grad_rel_err": "grad_err"}
    present = [(key, fmt) for key, fmt in columns if any(row.get(key) is not None for row in rows)]

    def cell(fmt, value):
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return "-".rjust(width) if value is None else fmt.format(value)

    header = " ".join(
        headers.get(key, key).rjust(int("".join(c for c in fmt.split(".")[0] if c.isdigit())))
        for key, fmt in present
    )
    lines = [header]
    for row in rows:
        lines.append(" ".join(cell(fmt, row.get(key)) for key, fmt in present))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--json", help="write all rows and device facts to this file")
    parser.add_argument("--shapes", nargs="*", default=list(NAMED_SHAPES), choices=list(NAMED_SHAPES))
    parser.add_argument("--layouts", nargs="*", default=["sb", "packed"], choices=["sb", "packed"])
    parser.add_argument(
        "--sweep-tokens", nargs="*", type=int, default=[1024, 4096, 16384, 65536],
        help="total tokens T for the sweep at the Qwen3 layer/expert count (4 sequences, sb layout)",
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shapes = [(name, NAMED_SHAPES[name], layout) for name in args.shapes for layout in args.layouts]
    sweep_layers, _, _, sweep_experts, sweep_dtype = NAMED_SHAPES["qwen3_sft"]
    shapes += [
        (f"sweep_T{tokens}", (sweep_layers, 4, tokens // 4, sweep_experts, sweep_dtype), "sb")
        for tokens in args.sweep_tokens
    ]
    if device.type == "cpu":
        print("CPU run: timings below are CPU timings (reference eager/compiled; the Triton kernels in "
              "the interpreter at a small shape only) and say nothing about GPU performance.")
        shapes = [("interp_small", CPU_INTERPRETER_SHAPE, "sb")] + shapes
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal_bw = next((bw for key, bw in NOMINAL_PEAK_BANDWIDTH.items() if key in device_name), None)
    copy_bw = measured_copy_bandwidth(device)
    facts = {
        "device": device_name,
        "torch": torch.__version__,
        "nominal_bw_GBps": nominal_bw / 1e9 if nominal_bw else None,
        "measured_copy_bw_GBps": copy_bw / 1e9 if copy_bw else None,
        "bytes_counted": "3 x logits (read fwd, read bwd, grad write)",
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(facts))

    rows = []
    for name, shape, layout in shapes:
        # On CPU the interpreter is far too slow for full shapes: there the kernels run only at the
        # small shape.
        include_fused = device.type == "cuda" or name == "interp_small"
        print(f"benchmarking {name} ({layout})", file=sys.stderr, flush=True)
        rows.extend(
            bench_shape(name, shape, layout, device, args.reps, nominal_bw, copy_bw, include_fused)
        )
        if args.json:  # rewritten after every shape, so a run cut short still leaves its rows
            with open(args.json, "w") as handle:
                json.dump({"device": facts, "rows": rows}, handle, indent=1)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
