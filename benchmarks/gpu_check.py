"""One command for a GPU visit: environment, kernel contract, kernel benchmark, training step,
numeric check and Transformer Engine, in one JSON and one Markdown table (docs/gpu.md).

    python benchmarks/gpu_check.py --out DIR      # writes DIR/gpu_check.json, prints the table last

On one H100 / H200 it is sized to finish within 8 minutes (`--budget-s`, default 450 s: a section
that would start past it is recorded as skipped). On a machine without CUDA it runs every section
at tiny shapes on the CPU (the Triton kernels in the interpreter, TRITON_INTERPRET=1) and writes the
same keys; those figures are a smoke test of the command, not measurements of anything.

Sections (JSON keys):
  environment        the device, driver/CUDA, torch, Triton, megatron-core, Transformer Engine,
                     and two ceilings measured here: device-to-device copy bandwidth, bf16 matmul rate
  kernel_contract    the fused routing-JS op against its reference, fp32 and bf16, padding, empty
                     sequences, segment ids (the cases of benchmarks/routing_js_contract.py)
  kernel_benchmark   forward and fwd+bwd time, bytes, share of the copy bandwidth, fused vs eager vs
                     torch.compile at Qwen3-30B-A3B and Phi-3.5-MoE shapes; all aligned layers in
                     one launch vs one launch per layer
  training_step      Qwen3-30B-A3B and Phi-3.5-MoE cut to 2 layers at full width, real-length mock
                     samples packed and padded: SARA, FFT (lambda_JS 0) and plain step times, real
                     tokens/s, model TFLOP/s, peak memory (the Trainer's own step, in a subprocess
                     per model)
  numeric_check      one fp32 step of the tiny model on this device against the same step on the CPU
  transformer_engine the training step with TE's layer spec where TE imports; else why not
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

# The kernels run on CPU tensors only in Triton's interpreter, chosen before triton is first
# imported (see kernels/sara_kernels/routing_js_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "examples", "tiny_cpu_sara.yaml")
SECTIONS = ("environment", "kernel_contract", "kernel_benchmark", "training_step",
            "numeric_check", "transformer_engine")
TARGETS = {
    "kernel_copy_share": 0.85,  # fused fwd+bwd bytes/s over the copy's, at >= 64k tokens/layer
    "sara_over_fft": 1.03,  # step time, real width
    "packed_over_padded": 3.0,  # real tokens/s
}
# The kernel benchmark starts no further shape with less than this left of the budget.
KEEP_FOR_TRAINING_S = 240.0
# fp32 step on the device vs the CPU: relative difference of each loss term and the grad norm.
NUMERIC_RTOL = {"ce": 1e-4, "lb": 1e-4, "js": 1e-3, "grad_norm": 1e-3}


# --- sizes -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """A training-step measurement: a preset cut to `num_layers` layers."""

    name: str
    preset: str
    num_layers: int
    seq_length: int
    micro_batch: int
    global_batch: int  # samples per step
    length_scale: float  # x the fixture interactions' lengths
    warmup: int
    steps: int
    padded_steps: int  # padded steps are ~global_batch rows: time fewer of them
    timeout_s: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one run measures: full shapes on a GPU, tiny ones on the CPU."""

    machine: str
    contract_tokens: tuple[int, int]  # (fp32 cases, bf16 cases) tokens
    # (name, layers, tokens per layer, experts): the kernel benchmark's shapes, most wanted first
    kernel_shapes: tuple[tuple[str, int, int, int], ...]
    sequence_tokens: int  # tokens per sequence in the benchmark's [S, B] layout
    whole_step: tuple[int, int, int]  # (layers, tokens, experts)
    reps: int
    compile_budget_s: float  # torch.compile is tried while section time is below this
    train: tuple[TrainShape, ...]


def gpu_profile(name: str) -> Profile:
    return Profile(
        machine=name,
        contract_tokens=(4099, 8191),
        kernel_shapes=(
            ("qwen3_30b_a3b", 28, 65536, 128), ("qwen3_30b_a3b", 28, 16384, 128),
            ("phi35_moe", 14, 65536, 16), ("qwen3_30b_a3b", 28, 4096, 128),
            ("phi35_moe", 14, 16384, 16),
        ),
        sequence_tokens=4096,
        whole_step=(28, 16384, 128),
        reps=10,
        compile_budget_s=75.0,
        train=(
            TrainShape("qwen3_30b_a3b", "qwen3_moe", 2, 4096, 1, 16, 3.0, 2, 4, 2, 240),
            TrainShape("phi35_moe", "phi35_moe", 2, 4096, 1, 16, 3.0, 2, 4, 2, 240),
        ),
    )


def cpu_profile(compile_budget_s: float) -> Profile:
    return Profile(
        machine=f"{os.cpu_count()}-core CPU",
        contract_tokens=(77, 93),
        kernel_shapes=(("qwen3_30b_a3b", 2, 128, 128), ("phi35_moe", 2, 128, 16)),
        sequence_tokens=64,
        whole_step=(2, 64, 128),
        reps=1,
        compile_budget_s=compile_budget_s,
        train=(
            TrainShape("qwen3_30b_a3b", "qwen3_moe_tiny", 2, 128, 1, 4, 0.5, 1, 1, 1, 150),
            TrainShape("phi35_moe", "phi35_moe_tiny", 2, 128, 1, 4, 0.5, 1, 1, 1, 150),
        ),
    )


# --- helpers -----------------------------------------------------------------------------------


def _median_ms(run, reps: int) -> float:
    """Median wall milliseconds of `run` (synchronised on a GPU), after one warm-up call."""
    run()
    samples = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _device_ms(run, reps: int) -> float:
    """GPU: triton's do_bench median (L2 flushed between calls); CPU: median wall time."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=5, rep=max(20, reps * 5),
                                             return_mode="median"))
    return _median_ms(run, reps)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent: not installed"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- a. environment ----------------------------------------------------------------------------


def transformer_engine_status() -> dict:
    """TE's version where it imports (with CUDA), else "absent" and why."""
    if importlib.util.find_spec("transformer_engine") is None:
        return {"available": False, "version": "absent",
                "why": "transformer_engine is not installed (no wheel of it travels: see "
                       "docs/gpu.md)"}
    if not torch.cuda.is_available():
        return {"available": False, "version": _version("transformer_engine"),
                "why": "installed, but there is no CUDA device"}
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # an ABI mismatch with torch shows here
        return {"available": False, "version": "absent",
                "why": f"transformer_engine.pytorch does not import: {error!r}"[:300]}
    version = getattr(sys.modules["transformer_engine"], "__version__", None)
    return {"available": True, "version": version or _version("transformer_engine")}


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def copy_bandwidth() -> dict:
    """Bytes read + written per second of a large device-to-device copy (1 GiB on a GPU, 64 MiB
    on the CPU)."""
    on_gpu = torch.cuda.is_available()
    numel = 2**28 if on_gpu else 2**24
    device = "cuda" if on_gpu else "cpu"
    source = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    ms = _device_ms(lambda: target.copy_(source), 10)
    del source, target
    return {"bytes": numel * 4, "ms": ms, "GBps": 2 * numel * 4 / (ms * 1e-3) / 1e9}


def matmul_rate() -> dict:
    """bf16 matmul rate: 8192^3 on a GPU, 256^3 on the CPU."""
    on_gpu = torch.cuda.is_available()
    n = 8192 if on_gpu else 256
    device = "cuda" if on_gpu else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _device_ms(lambda: a @ b, 10)
    return {"n": n, "ms": ms, "TFLOPs": 2 * n**3 / (ms * 1e-3) / 1e12}


def environment(profile: Profile) -> dict:
    import triton

    on_gpu = torch.cuda.is_available()
    env = {
        "machine": profile.machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "megatron_core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "transformer_engine": transformer_engine_status(),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_GiB=props.total_memory / 2**30,
                   sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}",
                   driver=_driver_version())
    else:
        env.update(gpu=None, gpu_memory_GiB=None, driver=None)
    env["copy_bandwidth"] = copy_bandwidth()
    env["bf16_matmul"] = matmul_rate()
    return env


# --- b. kernel contract ------------------------------------------------------------------------


def contract_cases(profile: Profile) -> list:
    """fp32 and bf16, [S, B] (padding, the last sequence empty), packed runs, shuffled segment
    ids, an all-padding batch; 16 and 128 experts."""
    from routing_js_contract import KernelCase

    t32, t16 = profile.contract_tokens
    bf16 = dict(dtype="bfloat16", js_rtol=2e-3, grad_rtol=2e-3)
    return [
        KernelCase("fp32_n128_sb", 2, t32, 128, 5),
        KernelCase("fp32_n128_packed", 2, t32, 128, 6, layout="packed"),
        KernelCase("fp32_n16_shuffled_ids", 2, t32, 16, 7, layout="shuffled"),
        KernelCase("fp32_all_padding", 2, min(t32, 257), 128, 3, layout="all_padding"),
        KernelCase("bf16_n128_sb", 2, t16, 128, 4, **bf16),
        KernelCase("bf16_n128_packed", 2, t16, 128, 6, layout="packed", **bf16),
        KernelCase("bf16_n16_packed", 2, t16, 16, 5, layout="packed", **bf16),
    ]


def kernel_contract(profile: Profile) -> dict:
    from routing_js_contract import case_passes, run_case

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in contract_cases(profile):
        result = run_case(case, device)
        rows.append({
            "case": case.name, "dtype": case.dtype, "layout": case.layout, "L": case.layers,
            "T": case.tokens, "N": case.experts, "B": case.sequences,
            "js_rel_error": result["js_rel_error"], "js_tolerance": case.js_rtol,
            "grad_rel_error": result["grad_rel_error"], "grad_tolerance": case.grad_rtol,
            "empty_sequences": result["empty_sequences"],
            "empty_js_all_zero": result["empty_js_all_zero"],
            "padding_grad_all_zero": result["padding_grad_all_zero"],
            "counts_match": result["counts_match"], "passes": case_passes(result),
        })
    return {
        "reference": "sequence_routing_js_reference (same inputs, upcast) vs the Triton kernels",
        "cases": rows,
        "all_pass": all(row["passes"] for row in rows),
        "max_js_rel_error": {d: max(r["js_rel_error"] for r in rows if r["dtype"] == d)
                             for d in ("float32", "bfloat16")},
        "max_grad_rel_error": {d: max(r["grad_rel_error"] for r in rows if r["dtype"] == d)
                               for d in ("float32", "bfloat16")},
    }


# --- c. kernel benchmark -----------------------------------------------------------------------


def _time_ms(run, reps: int) -> float:
    """Kernel time on a GPU (profiler: the launched kernels' durations, L2 flushed), wall time
    on the CPU."""
    if torch.cuda.is_available():
        from routing_js_benchmarking import kernel_time_ms

        return kernel_time_ms(run, reps)[0]
    return _median_ms(run, reps)


def kernel_benchmark(profile: Profile, copy_GBps: float, started: float,
                     deadline: float = math.inf) -> dict:
    from routing_js_benchmarking import benchmark_inputs

    from sara_megatron.kernels import sequence_routing_js, sequence_routing_js_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, notes = [], []
    for name, layers, tokens, experts in profile.kernel_shapes:
        if deadline - time.perf_counter() < KEEP_FOR_TRAINING_S:
            notes.append(f"{name} T={tokens}: skipped, the training steps need the time left")
            continue
        sequences = max(1, tokens // profile.sequence_tokens)
        logits, ids, prior = benchmark_inputs(layers, sequences, tokens // sequences, experts,
                                              torch.bfloat16, "sb", device)
        logits.requires_grad_()

        def eager(x, ids=ids, prior=prior):
            return sequence_routing_js_reference(x, ids, prior, validate=False)

        impls = {
            "fused": lambda x, ids=ids, prior=prior: sequence_routing_js(
                x, ids, prior, validate=False, impl="triton"),
            "eager": eager,
        }
        if time.perf_counter() - started < profile.compile_budget_s:
            impls["compile"] = torch.compile(eager, dynamic=False)
        else:
            notes.append(f"{name} T={tokens}: torch.compile skipped (section past its "
                         f"{profile.compile_budget_s:.0f} s compile budget)")
        logits_bytes = logits.numel() * logits.element_size()
        for impl, fn in impls.items():
            def forward(fn=fn):
                return fn(logits)

            def forward_backward(fn=fn):
                return torch.autograd.grad(fn(logits).mean(), logits)

            try:
                fwd_ms = _time_ms(forward, profile.reps)
                fwd_bwd_ms = _time_ms(forward_backward, profile.reps)
            except Exception as error:  # an OOM or a compiler failure costs one row, not all
                notes.append(f"{name} T={tokens} {impl}: {error!r}"[:300])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            row = {"shape": name, "impl": impl, "L": layers, "T": tokens, "N": experts,
                   "B": sequences, "dtype": "bfloat16", "logits_MB": logits_bytes / 2**20,
                   "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                   # The bytes the op cannot avoid: logits read in forward; read again in
                   # backward and the gradient written.
                   "fwd_bytes": logits_bytes, "fwd_bwd_bytes": 3 * logits_bytes}
            row["fwd_GBps"] = logits_bytes / (fwd_ms * 1e-3) / 1e9
            row["fwd_bwd_GBps"] = 3 * logits_bytes / (fwd_bwd_ms * 1e-3) / 1e9
            row["fwd_copy_share"] = row["fwd_GBps"] / copy_GBps
            row["fwd_bwd_copy_share"] = row["fwd_bwd_GBps"] / copy_GBps
            rows.append(row)
        del logits, ids, prior, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        fused = next((r for r in rows if r["impl"] == "fused" and r["shape"] == row["shape"]
                      and r["T"] == row["T"]), None)
        row["fused_speedup"] = row["fwd_bwd_ms"] / fused["fwd_bwd_ms"] if fused else None
    return {
        "timing": ("kernel time (profiler, L2 flushed)" if device.type == "cuda"
                   else "CPU wall time; kernels in Triton's interpreter"),
        "bytes_counted": "forward: logits once; fwd+bwd: 3 x logits (read, read, gradient write)",
        "copy_GBps": copy_GBps,
        "rows": rows,
        "whole_step": whole_step(profile),
        "notes": notes,
    }


def whole_step(profile: Profile) -> dict:
    """All aligned layers' JS in one launch ([L, T, N]) against one call per layer ([T, N] each,
    as the routers produce them), forward and backward."""
    from routing_js_benchmarking import benchmark_inputs

    from sara_megatron.kernels import sequence_routing_js

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers, tokens, experts = profile.whole_step
    sequences = max(1, tokens // profile.sequence_tokens)
    logits, ids, prior = benchmark_inputs(layers, sequences, tokens // sequences, experts,
                                          torch.bfloat16, "sb", device)
    stacked = logits.detach().clone().requires_grad_()
    per_layer = [logits[i].detach().clone().requires_grad_() for i in range(layers)]

    def one_launch():
        js = sequence_routing_js(stacked, ids, prior, validate=False, impl="triton")
        return torch.autograd.grad(js.mean(), stacked)

    def per_layer_launches():
        total = sum(sequence_routing_js(x, ids, prior[i], validate=False, impl="triton").mean()
                    for i, x in enumerate(per_layer))
        return torch.autograd.grad(total / layers, per_layer)

    out = {"L": layers, "T": tokens, "N": experts, "dtype": "bfloat16",
           "kernel_supports_all_layers": True,
           "note": "the kernel takes [L, T, N]; in a training step each router calls it for its "
                   "own layer ([T, N]), so a step makes one launch pair per aligned layer"}
    for key, run in (("one_launch", one_launch), ("per_layer", per_layer_launches)):
        out[f"{key}_ms"] = _time_ms(run, profile.reps)
        out[f"{key}_called_ms"] = _device_ms(run, profile.reps)  # launch overhead included
    out["per_layer_over_one_launch"] = out["per_layer_called_ms"] / out["one_launch_called_ms"]
    return out


# --- d. and f. training step (a worker process per model) --------------------------------------


def _trainer_overrides(shape: TrainShape, steps: int, use_te: bool | None) -> list[str]:
    overrides = [
        f"model.preset={shape.preset}", f"model.num_layers={shape.num_layers}",
        "model.checkpoint=null", "data.mock=true", "data.shards_dir=null", "data.prior_store=null",
        f"data.seq_length={shape.seq_length}", f"data.micro_batch_size={shape.micro_batch}",
        f"data.global_batch_size={shape.global_batch}", "parallel.ep=1", "sara.layers=all",
        "sara.lambda_js=1.5", f"optim.train_steps={steps}", "logging.log_interval=1000000",
        "checkpoint.save_dir=null",
    ]
    if use_te is not None:
        overrides.append(f"model.use_te={str(use_te).lower()}")
    return overrides


def train_worker(args) -> dict:
    """Measure each model of `--shapes` in this process, one after the other: {name: result}."""
    out = {}
    for fields in json.loads(args.shapes):
        shape = TrainShape(**fields)
        out[shape.name] = measure_training(shape, args.layouts.split(","), args.use_te)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def measure_training(shape: TrainShape, layouts: list[str], use_te: bool | None) -> dict:
    """One model: for packed and padded real-length samples, SARA (lambda_JS 1.5), FFT
    (lambda_JS 0, the same code path) and plain (no SARA term at all) steps of one Trainer (the
    objective switched between runs as a fresh Trainer would set it)."""
    from bench_packing import fixture_lengths

    from sara_megatron.data.mock_batches import MockSampleLoader
    from sara_megatron.training import Trainer, load_train_config

    per_run = shape.warmup + max(shape.steps, shape.padded_steps)
    cfg = load_train_config(CONFIG, _trainer_overrides(shape, 6 * per_run + 10, use_te))
    trainer = Trainer(cfg)
    state = trainer.state
    objectives = state.objectives  # SARA's, at λ_JS 1.5 and 0 (FFT); none: plain
    sara = objectives[0].loss if objectives else None
    on_gpu = torch.cuda.is_available()
    arch = trainer.arch
    result = {"preset": shape.preset, "num_layers": arch.num_layers,
              "hidden": arch.hidden_size, "experts": arch.num_experts,
              "top_k": arch.moe_router_topk, "seq_length": shape.seq_length,
              "micro_batch_rows": shape.micro_batch, "global_batch_samples": shape.global_batch,
              "length_scale": shape.length_scale, "dtype": str(next(
                  state.chunks[0].parameters()).dtype).removeprefix("torch."),
              "spec": "transformer_engine" if use_te else "local",
              "device": torch.cuda.get_device_name() if on_gpu else "cpu", "runs": {}}
    lengths = fixture_lengths()
    for layout in layouts:
        loader = MockSampleLoader(
            vocab_size=arch.vocab_size, num_experts=arch.num_experts,
            prior_layers=trainer.alignment_layers, lengths=lengths,
            seq_length=shape.seq_length, micro_batch_size=shape.micro_batch,
            global_batch_size=shape.global_batch, packed=layout == "packed",
            length_scale=shape.length_scale, seed=cfg.seed)
        for objective in ("sara", "fft", "plain"):
            state.objectives = [] if objective == "plain" else objectives
            if sara is not None:
                sara.coeff = 1.5 if objective == "sara" else 0.0
            trainer.batches = iter(loader)  # every objective sees the same samples
            steps = shape.steps if layout == "packed" else shape.padded_steps
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            records = [trainer.train_step() for _ in range(shape.warmup + steps)]
            timed = records[shape.warmup:]
            middle = sorted(timed, key=lambda r: r.step_time_s)[len(timed) // 2]
            result["runs"][f"{layout}/{objective}"] = {
                "step_s": middle.step_time_s, "real_tokens_per_s": middle.tokens_per_s,
                "tflops_per_gpu": middle.tflops_per_gpu,
                "peak_memory_GiB": (torch.cuda.max_memory_allocated() / 2**30 if on_gpu
                                    else None),
                "fill_rate": statistics.mean(loader.fill_rate(i) for i in range(len(records))),
                "first_step": {"ce": records[0].ce, "lb": records[0].lb, "js": records[0].js,
                               "grad_norm": records[0].grad_norm},
                "timed_steps": len(timed),
            }
    state.objectives = objectives
    del trainer, state
    runs = result["runs"]
    for layout in layouts:
        fft, run = runs.get(f"{layout}/fft"), runs.get(f"{layout}/sara")
        plain = runs.get(f"{layout}/plain")
        if fft and run:
            result[f"{layout}_sara_over_fft"] = run["step_s"] / fft["step_s"]
        if plain and run:
            result[f"{layout}_sara_over_plain"] = run["step_s"] / plain["step_s"]
    if "packed/sara" in runs and "padded/sara" in runs:
        result["packed_over_padded_tokens_per_s"] = (
            runs["packed/sara"]["real_tokens_per_s"] / runs["padded/sara"]["real_tokens_per_s"])
    return result


def numeric_worker(args) -> dict:
    """`--sides cpu,device`: the numeric check's step once per side, in this process, a fresh
    Trainer each: {side: result}. The cpu side writes `--save-weights`, the device side reads
    `--load-weights`."""
    out = {}
    for side in args.sides.split(","):
        out[side] = numeric_step(save_weights=args.save_weights if side == "cpu" else None,
                                 load_weights=args.load_weights if side == "device" else None)
    return out


def numeric_step(save_weights: str | None, load_weights: str | None) -> dict:
    """One fp32 step of the tiny model (local spec, SARA on all layers) on this process's
    device. The CPU run saves its initial weights and the device run loads them, so both start
    from the same weights and see the same mock batch."""
    from sara_megatron.kernels.routing_js import resolve_implementation
    from sara_megatron.training import Trainer, load_train_config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_train_config(CONFIG, [
        "model.checkpoint=null", "model.bf16=false", "model.use_te=false", "data.mock=true",
        "data.shards_dir=null", "data.prior_store=null", "parallel.ep=1", "data.seq_length=64",
        "data.micro_batch_size=2", "data.global_batch_size=4", "sara.layers=all",
        "optim.train_steps=2", "logging.log_interval=1000000", "checkpoint.save_dir=null",
    ])
    trainer = Trainer(cfg)
    record_device = trainer.device
    model = trainer.chunks[0]
    while hasattr(model, "module"):
        model = model.module
    if save_weights:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor)}, save_weights)
    if load_weights:
        saved = torch.load(load_weights, map_location="cpu")
        missing, unexpected = model.load_state_dict(saved, strict=False)
        tensors = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        if set(missing) & tensors or unexpected:
            raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        reload = getattr(trainer.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()
    record = trainer.train_step()
    del trainer, model
    return {"device": str(record_device), "ce": record.ce, "lb": record.lb, "js": record.js,
            "grad_norm": record.grad_norm,
            "sara_impl": resolve_implementation("auto", record_device),
            "tf32": False}


@dataclasses.dataclass
class Worker:
    """A worker process of this script, started; `finish()` waits for its result."""

    name: str
    proc: subprocess.Popen
    result_path: str
    log_path: str
    started: float
    timeout: float

    def finish(self, timeout: float | None = None) -> dict:
        """Its JSON result, or an error with the log's tail (killed past its time)."""
        left = self.timeout - (time.perf_counter() - self.started)
        try:
            code = self.proc.wait(timeout=max(1.0, min(left, timeout or left)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = "timeout"
        wall = time.perf_counter() - self.started
        if code == 0 and os.path.exists(self.result_path):
            with open(self.result_path) as handle:
                return {**json.load(handle), "wall_s": wall}
        with open(self.log_path) as handle:
            tail = handle.read()[-2000:]
        return {"error": f"worker {self.name} ended with {code} after {wall:.0f} s",
                "log_tail": tail, "wall_s": wall}


def start_worker(out_dir: str, name: str, worker_args: list[str], timeout: float,
                 env: dict | None = None) -> Worker:
    """Start this script as a worker (`--worker ...`), its output in DIR/workers/<name>.log."""
    result_path = os.path.join(out_dir, "workers", f"{name}.json")
    log_path = os.path.join(out_dir, "workers", f"{name}.log")
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *worker_args,
           "--worker-out", result_path]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=ROOT)
    return Worker(name, proc, result_path, log_path, time.perf_counter(), timeout)


def _run_worker(out_dir: str, name: str, worker_args: list[str], timeout: float,
                env: dict | None = None) -> dict:
    """Run a worker to its end: its JSON result, or an error with the log's tail."""
    return start_worker(out_dir, name, worker_args, timeout, env).finish()


def training_step(profile: Profile, out_dir: str, deadline: float, use_te: bool | None = None,
                  layouts: str = "packed,padded") -> dict:
    """The models' training steps in worker processes: on a GPU one process per model (each
    frees all its memory; one that fails costs only its own figures), on the CPU one for all
    (a process start costs seconds there)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the kernel benchmark's cached blocks, before a worker starts
    groups = ([[shape] for shape in profile.train] if torch.cuda.is_available()
              else [list(profile.train)])
    out = {}
    for group in groups:
        names = "_".join(shape.name for shape in group)
        left = deadline - time.perf_counter()
        if left < 30:
            out.update({shape.name: {"skipped": f"time budget: {left:.0f} s left"}
                        for shape in group})
            continue
        worker = ["train", "--shapes", json.dumps([dataclasses.asdict(s) for s in group]),
                  "--layouts", layouts]
        if use_te is not None:
            worker.append("--use-te" if use_te else "--no-use-te")
        result = _run_worker(out_dir, f"train_{names}{'_te' if use_te else ''}", worker,
                             min(sum(shape.timeout_s for shape in group), left))
        for shape in group:
            out[shape.name] = result.get(shape.name) or {
                key: value for key, value in result.items() if key in ("error", "log_tail")}
            out[shape.name]["worker_wall_s"] = result.get("wall_s")
    return out


# --- e. numeric check --------------------------------------------------------------------------


def _numeric_args(out_dir: str) -> list[str]:
    weights = os.path.join(out_dir, "workers", "numeric_weights.pt")
    return ["numeric", "--save-weights", weights, "--load-weights", weights]


def start_numeric_cpu(out_dir: str, timeout: float) -> Worker:
    """The numeric check's CPU side, in a process that cannot see the GPU: on a GPU machine it
    runs beside the kernel sections (it needs a few of the 16 cores, no GPU)."""
    return start_worker(out_dir, "numeric_cpu", [*_numeric_args(out_dir), "--sides", "cpu"],
                        timeout, env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"})


def numeric_check(out_dir: str, deadline: float, cpu_side: Worker | None = None) -> dict:
    """The CPU side (`cpu_side`, started earlier) then the device side from its weights; on a
    machine without a GPU both sides in one process (two Trainers)."""
    sides = _numeric_args(out_dir)
    if torch.cuda.is_available():
        cpu_side = cpu_side or start_numeric_cpu(out_dir, 180)
        cpu = cpu_side.finish(timeout=max(1.0, deadline - time.perf_counter()))
        cpu = cpu.get("cpu", cpu)
        if "error" in cpu:
            return {"cpu": cpu, "passes": False}
        left = deadline - time.perf_counter()
        device = _run_worker(out_dir, "numeric_device", [*sides, "--sides", "device"],
                             min(180, left))
        device = device.get("device", device)
    else:
        both = _run_worker(out_dir, "numeric", [*sides, "--sides", "cpu,device"],
                           min(240, deadline - time.perf_counter()))
        if "error" in both:
            return {"cpu": both, "passes": False}
        cpu, device = both["cpu"], both["device"]
    out = {"cpu": cpu, "device": device, "rtol": NUMERIC_RTOL}
    if "error" in device:
        out["passes"] = False
        return out
    diffs = {key: abs(device[key] - cpu[key]) / max(abs(cpu[key]), 1e-12) for key in NUMERIC_RTOL}
    out["rel_diff"] = diffs
    out["passes"] = all(diffs[key] <= NUMERIC_RTOL[key] for key in NUMERIC_RTOL)
    if not torch.cuda.is_available():
        out["note"] = "no GPU: both sides ran on the CPU (a check of the command, not of a GPU)"
    return out


# --- f. Transformer Engine ---------------------------------------------------------------------

TE_PACKING_NOT_WIRED = (
    "packed TE step not compared: the trainer refuses data.packing with Transformer Engine "
    "(training/packed_step.py check_packing_config); models.packed_attention.thd_packed_inputs "
    "is built and tested on the CPU but not wired into the training forward, and wiring it "
    "untested (no TE on the machines this was written on) was judged unsafe")


def transformer_engine(profile: Profile, out_dir: str, deadline: float, status: dict) -> dict:
    if not status["available"]:
        return {"ran": False, "why": status.get("why", "absent"),
                "packed_comparison": TE_PACKING_NOT_WIRED}
    # Padded only: the trainer refuses packing under TE (see TE_PACKING_NOT_WIRED).
    runs = training_step(profile, out_dir, deadline, use_te=True, layouts="padded")
    return {"ran": True, "version": status.get("version"), "training_step": runs,
            "packed_comparison": TE_PACKING_NOT_WIRED}


# --- targets and the table ---------------------------------------------------------------------


def evaluate_targets(report: dict, on_gpu: bool) -> dict:
    """Each target's measured value and whether it is met (None where not measured; on a CPU
    nothing is judged)."""
    out = {}
    rows = (report.get("kernel_benchmark") or {}).get("rows") or []
    big = [r for r in rows if r["impl"] == "fused" and r["T"] >= 65536]
    share = min((r["fwd_bwd_copy_share"] for r in big), default=None)
    out["kernel_fwd_bwd_copy_share_at_64k"] = {"target": f">= {TARGETS['kernel_copy_share']}",
                                               "value": share}
    for name, run in (report.get("training_step") or {}).items():
        if not isinstance(run, dict) or "runs" not in run:
            continue
        out[f"{name}_sara_over_fft"] = {"target": f"<= {TARGETS['sara_over_fft']}",
                                        "value": run.get("packed_sara_over_fft")}
        out[f"{name}_packed_over_padded"] = {"target": f">= {TARGETS['packed_over_padded']}",
                                             "value": run.get("packed_over_padded_tokens_per_s")}
    for key, item in out.items():
        value = item["value"]
        if value is None or not on_gpu:
            item["met"] = None
        elif key.endswith("copy_share_at_64k"):
            item["met"] = value >= TARGETS["kernel_copy_share"]
        elif key.endswith("sara_over_fft"):
            item["met"] = value <= TARGETS["sara_over_fft"]
        else:
            item["met"] = value >= TARGETS["packed_over_padded"]
    return out


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown_table(report: dict) -> str:
    """| section | measure | value | target | met |: one line per figure that matters."""
    lines = ["| section | measure | value | target | met |", "| --- | --- | --- | --- | --- |"]

    def add(section, measure, value, target="", met=None):
        lines.append(f"| {section} | {measure} | {_fmt(value)} | {target} | "
                     f"{'' if met is None else _fmt(met)} |")

    env = report.get("environment") or {}
    if "error" in env or "skipped" in env:
        add("environment", "error", env.get("error") or env.get("skipped"))
    else:
        add("environment", "machine", env.get("gpu") or env.get("machine"))
        add("environment", "torch / triton / megatron-core",
            f"{env.get('torch')} / {env.get('triton')} / {env.get('megatron_core')}")
        add("environment", "transformer engine", env["transformer_engine"]["version"])
        add("environment", "copy GB/s", env["copy_bandwidth"]["GBps"])
        add("environment", "bf16 matmul TFLOP/s", env["bf16_matmul"]["TFLOPs"])
    contract = report.get("kernel_contract") or {}
    if "cases" in contract:
        for dtype in ("float32", "bfloat16"):
            add("kernel contract", f"{dtype} max rel. error js / grad",
                f"{contract['max_js_rel_error'][dtype]:.1e} / "
                f"{contract['max_grad_rel_error'][dtype]:.1e}")
        add("kernel contract", f"{len(contract['cases'])} cases pass", contract["all_pass"])
    else:
        add("kernel contract", "error", contract.get("error") or contract.get("skipped"))
    bench = report.get("kernel_benchmark") or {}
    for row in bench.get("rows", []):
        add("kernel benchmark", f"{row['shape']} L={row['L']} T={row['T']} {row['impl']} "
            "fwd / fwd+bwd ms", f"{row['fwd_ms']:.3g} / {row['fwd_bwd_ms']:.3g}",
            "", None)
        if row["impl"] == "fused":
            add("kernel benchmark", f"{row['shape']} T={row['T']} fused fwd+bwd share of copy",
                row["fwd_bwd_copy_share"], f">= {TARGETS['kernel_copy_share']} at T >= 64k")
    if "whole_step" in bench:
        w = bench["whole_step"]
        add("kernel benchmark", f"whole step L={w['L']} T={w['T']}: per-layer / one launch "
            "(called, ms)", f"{w['per_layer_called_ms']:.3g} / {w['one_launch_called_ms']:.3g}")
    if "error" in bench or "skipped" in bench:
        add("kernel benchmark", "error", bench.get("error") or bench.get("skipped"))
    for section, runs in (("training step", report.get("training_step") or {}),
                          ("transformer engine", ((report.get("transformer_engine") or {})
                                                  .get("training_step") or {}))):
        if "error" in runs or "skipped" in runs:
            add(section, "error", runs.get("error") or runs.get("skipped"))
            continue
        for name, run in runs.items():
            if not isinstance(run, dict):
                continue
            if "runs" not in run:
                add(section, name, run.get("error") or run.get("skipped"))
                continue
            for key, r in run["runs"].items():
                add(section, f"{name} {run['spec']} {key}: step s / real tok/s / TFLOP/s / "
                    "peak GiB", f"{r['step_s']:.3g} / {r['real_tokens_per_s']:.4g} / "
                    f"{r['tflops_per_gpu']:.3g} / {_fmt(r['peak_memory_GiB'])}")
            targets = report.get("targets", {})
            if "packed_sara_over_fft" in run:
                t = targets.get(f"{name}_sara_over_fft", {})
                add(section, f"{name} SARA / FFT step time (packed)",
                    run["packed_sara_over_fft"], f"<= {TARGETS['sara_over_fft']}", t.get("met"))
            if "packed_over_padded_tokens_per_s" in run:
                t = targets.get(f"{name}_packed_over_padded", {})
                add(section, f"{name} packed / padded real tok/s",
                    run["packed_over_padded_tokens_per_s"],
                    f">= {TARGETS['packed_over_padded']}", t.get("met"))
    numeric = report.get("numeric_check") or {}
    if "rel_diff" in numeric:
        for key, diff in numeric["rel_diff"].items():
            add("numeric check", f"{key} rel. diff device vs CPU", f"{diff:.1e}",
                f"<= {NUMERIC_RTOL[key]:g}", diff <= NUMERIC_RTOL[key])
    else:
        add("numeric check", "error", numeric.get("error") or numeric.get("skipped")
            or (numeric.get("device") or numeric.get("cpu") or {}).get("error"))
    te = report.get("transformer_engine") or {}
    add("transformer engine", "ran", te.get("ran"), "", None)
    if not te.get("ran"):
        add("transformer engine", "why not", te.get("why") or te.get("error"))
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def _section(report: dict, name: str, deadline: float, run, path: str) -> None:
    """Run one section into report[name] (its error recorded, not raised); rewrite the JSON."""
    left = deadline - time.perf_counter()
    if left < 5:
        report[name] = {"skipped": f"time budget: {left:.0f} s left"}
    else:
        started = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = run()
        except Exception as error:
            report[name] = {"error": repr(error)[:500], "traceback": traceback.format_exc()[-3000:]}
        if isinstance(report[name], dict):
            report[name]["section_s"] = time.perf_counter() - started
    _write(report, path)


def _write(report: dict, path: str) -> None:
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    os.replace(partial, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json (and workers/: logs)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall-clock budget; a section that would start past it is skipped")
    parser.add_argument("--cpu-compile-budget-s", type=float, default=0.0,
                        help="CPU run only: time torch.compile while the kernel benchmark is "
                             "younger than this (it costs ~20 s a shape on 2 cores; 0: skip)")
    parser.add_argument("--worker", choices=("train", "numeric"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    parser.add_argument("--sides", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default="packed,padded", help=argparse.SUPPRESS)
    parser.add_argument("--use-te", dest="use_te", action="store_true", default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--no-use-te", dest="use_te", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--save-weights", help=argparse.SUPPRESS)
    parser.add_argument("--load-weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)  # the benchmark helpers beside this script

    if args.worker:
        if not args.worker_out:
            parser.error("--worker needs --worker-out")
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = train_worker(args) if args.worker == "train" else numeric_worker(args)
        with open(args.worker_out, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        from sara_megatron.distributed import destroy_distributed

        destroy_distributed()
        return 0

    if not args.out:
        parser.error("--out DIR is required")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    started = time.perf_counter()
    deadline = started + args.budget_s
    on_gpu = torch.cuda.is_available()
    profile = (gpu_profile(torch.cuda.get_device_name(0)) if on_gpu
               else cpu_profile(args.cpu_compile_budget_s))
    report = {"command": "python benchmarks/gpu_check.py --out DIR", "machine": profile.machine,
              "on_gpu": on_gpu, "budget_s": args.budget_s,
              "note": None if on_gpu else ("no CUDA: every section at tiny shapes on the CPU; "
                                           "a smoke test of the command, not a measurement")}
    # The numeric check's CPU side needs no GPU: on a GPU machine it runs beside the kernels.
    numeric_cpu = start_numeric_cpu(args.out, 240) if on_gpu else None
    _section(report, "environment", deadline, lambda: environment(profile), path)
    copy_GBps = (report["environment"].get("copy_bandwidth") or {}).get("GBps") or float("nan")
    te_status = report["environment"].get("transformer_engine") or transformer_engine_status()
    _section(report, "kernel_contract", deadline, lambda: kernel_contract(profile), path)
    _section(report, "kernel_benchmark", deadline,
             lambda: kernel_benchmark(profile, copy_GBps, time.perf_counter(),
                                      deadline if on_gpu else math.inf), path)
    _section(report, "training_step", deadline,
             lambda: training_step(profile, args.out, deadline,
                                   use_te=False if te_status["available"] else None), path)
    _section(report, "numeric_check", deadline,
             lambda: numeric_check(args.out, deadline, numeric_cpu), path)
    if numeric_cpu is not None and numeric_cpu.proc.poll() is None:  # skipped: do not leave it
        numeric_cpu.proc.kill()
        numeric_cpu.proc.wait()
    _section(report, "transformer_engine", deadline,
             lambda: transformer_engine(profile, args.out, deadline, te_status), path)
    report = {key: report[key] for key in (*[k for k in report if k not in SECTIONS], *SECTIONS)}
    report["targets"] = evaluate_targets(report, on_gpu)
    report["elapsed_s"] = time.perf_counter() - started
    _write(report, path)
    print(f"gpu_check: {path} ({report['elapsed_s']:.0f} s on {profile.machine})")
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
