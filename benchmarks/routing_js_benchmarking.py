"""What the compiler makes of a routing-JS launch, on any machine, and the configs worth timing.

A memory-bound kernel's speed is set by how many bytes each SM keeps in flight, which is set by
how many programs fit on an SM at once (registers and shared memory per program) and by how evenly
the grid fills the SMs (waves); and, when its arithmetic is dense, by the instructions it issues
per byte. All of it can be known without a GPU: Triton ships ptxas, so `compile_launch` /
`compile_for_target` compile a `KernelLaunch` for a GPU architecture with exactly the
specialisation the JIT would give it at launch (argument dtypes, 16-byte alignment and
divisibility of pointers and integers) and read the registers, spills and shared memory of the
cubin. `occupancy` turns those into resident programs per SM and the grid into waves.

On a GPU, `benchmarks/tune_routing_js.py` times `candidate_configs` with these facts beside each.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import tempfile

import triton

from sara_megatron.kernels.routing_js_triton import (
    KernelLaunch,
    LaunchConfig,
    accumulate_launches,
    backward_launch,
    expert_block,
)

# Qwen3-30B-A3B's and Phi-3.5-MoE's aligned layers at 4 sequences of 4096 tokens:
# (layers, sequences, tokens per sequence, experts, dtype name).
BENCHMARK_SHAPES = {
    "qwen3_sft": (28, 4, 4096, 128, "bfloat16"),
    "phi_sft": (14, 4, 4096, 16, "bfloat16"),
}

# Nominal HBM bandwidth by device name (bytes/s).
NOMINAL_PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}


def benchmark_inputs(layers, sequences, tokens_per_sequence, experts, dtype, layout, device, seed=0):
    """Logits [L, T, N] (std 2, `dtype`), segment ids [T] and priors [L, B, N] for a benchmark.

    layout "sb" is Megatron's [S, B] flattening (token s·B + b belongs to sequence b), "packed"
    puts each sequence's tokens contiguously.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    logits = 2.0 * torch.randn(layers, sequences * tokens_per_sequence, experts, generator=generator)
    prior = torch.softmax(torch.randn(layers, sequences, experts, generator=generator), -1)
    ids = torch.arange(sequences, dtype=torch.int64)
    if layout == "sb":
        segment_ids = ids.repeat(tokens_per_sequence)
    elif layout == "packed":
        segment_ids = ids.repeat_interleave(tokens_per_sequence)
    else:
        raise ValueError(f"layout must be 'sb' or 'packed', got {layout!r}")
    return logits.to(device, dtype), segment_ids.to(device), prior.to(device)


# Per-program shared memory the CUDA runtime reserves on sm_80 and later.
_RESERVED_SHARED_PER_PROGRAM = 1024
# Registers are allocated per warp in units of 256.
_REGISTER_ALLOCATION_UNIT = 256


@dataclasses.dataclass(frozen=True)
class SMResources:
    """What one streaming multiprocessor holds, and how many there are."""

    name: str
    num_sms: int
    registers: int = 65536
    shared_bytes: int = 228 * 1024
    max_warps: int = 64
    max_programs: int = 32


H100_SXM = SMResources("H100 SXM (sm_90)", num_sms=132)


def device_resources(device) -> SMResources:
    """The SM resources of a CUDA device, from its properties."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return SMResources(
        name=f"{props.name} (sm_{props.major}{props.minor})",
        num_sms=props.multi_processor_count,
        registers=props.regs_per_multiprocessor,
        shared_bytes=props.shared_memory_per_multiprocessor,
        max_warps=props.max_threads_per_multi_processor // 32,
    )


@dataclasses.dataclass(frozen=True)
class CompiledFacts:
    kernel: str
    registers: int  # per thread
    spill_bytes: int  # stack and local memory per thread (0 = no spills)
    shared_bytes: int  # per program
    num_warps: int


def compile_launch(launch: KernelLaunch, arch: int = 90):
    """Triton's compiled kernel (`.asm` holds its ttgir, ptx and cubin) for `launch` on sm_`arch`,
    specialised as the JIT would specialise it, without launching it.

    Uses Triton's own argument binder and specialisation (private to triton; checked against
    triton 3.9), so a pointer or integer divisible by 16 gets the same alignment hints, hence the
    same vectorised loads, as at a real launch.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError(
            "compile_for_target needs the compiled kernels: run without TRITON_INTERPRET=1"
        )
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(
        *launch.args, **launch.constexprs, **launch.compile_options
    )
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, options, bound_args, specialization, options
    )
    return triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def compile_for_target(launch: KernelLaunch, arch: int = 90) -> CompiledFacts:
    """Registers, spills and shared memory of `launch` compiled for sm_`arch` (`compile_launch`)."""
    compiled = compile_launch(launch, arch)
    registers, spill_bytes = _cubin_resource_usage(compiled.asm["cubin"], launch.kernel.__name__)
    return CompiledFacts(
        kernel=launch.kernel.__name__,
        registers=registers,
        spill_bytes=spill_bytes,
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
    )


def _cubin_resource_usage(cubin: bytes, kernel_name: str) -> tuple[int, int]:
    """(registers per thread, stack and local bytes per thread) of `kernel_name`, read with
    cuobjdump. ptxas puts register spills on the stack (STACK), not in LOCAL, which counts only
    local arrays: a kernel capped at too few registers reports e.g. STACK:24 LOCAL:0."""
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run(
            [cuobjdump, "--dump-resource-usage", handle.name],
            check=True, capture_output=True, text=True,
        ).stdout
    match = re.search(
        rf"Function {re.escape(kernel_name)}:\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)",
        report,
    )
    if match is None:
        raise RuntimeError(f"no resource usage for {kernel_name} in cuobjdump's report:\n{report}")
    return int(match.group(1)), int(match.group(2)) + int(match.group(3))


@dataclasses.dataclass(frozen=True)
class Occupancy:
    programs_per_sm: int
    warps_per_sm: int
    limited_by: str  # registers | shared | warps | programs
    waves: float  # grid programs / (SMs × programs per SM)


def occupancy(facts: CompiledFacts, num_programs: int, resources: SMResources = H100_SXM) -> Occupancy:
    """Resident programs per SM for a compiled kernel, and how many waves `num_programs` make."""
    registers_per_warp = math.ceil(facts.registers * 32 / _REGISTER_ALLOCATION_UNIT) * (
        _REGISTER_ALLOCATION_UNIT
    )
    limits = {
        "registers": resources.registers // (registers_per_warp * facts.num_warps),
        "shared": resources.shared_bytes // (facts.shared_bytes + _RESERVED_SHARED_PER_PROGRAM),
        "warps": resources.max_warps // facts.num_warps,
        "programs": resources.max_programs,
    }
    limited_by = min(limits, key=limits.get)
    programs_per_sm = limits[limited_by]
    if programs_per_sm < 1:
        raise ValueError(f"{facts.kernel} does not fit on one SM of {resources.name}: {facts}")
    return Occupancy(
        programs_per_sm=programs_per_sm,
        warps_per_sm=programs_per_sm * facts.num_warps,
        limited_by=limited_by,
        waves=num_programs / (programs_per_sm * resources.num_sms),
    )


def candidate_configs(direction: str, num_experts: int) -> list[LaunchConfig]:
    """Launch configs worth timing for one direction: tiles of 2048 to 8192 elements (16 to 256
    tokens), up to 16 tiles per program in forward (its atomics amortise over them), up to 4 in
    backward, 4 or 8 warps, 1 to 3 pipeline stages where there is a loop; in forward each with
    the chunk paths in one launch and split in two (split, 3 stages is left out: its periodic
    launch, the one that does the work, compiles as with 2)."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    block_n = expert_block(num_experts)
    block_ts = sorted({max(16, min(256, elements // block_n)) for elements in (2048, 4096, 8192)})
    tiles = (1, 2, 4, 8, 16) if direction == "forward" else (1, 2, 4)
    splits = (False, True) if direction == "forward" else (False,)
    return [
        LaunchConfig(block_t, tiles_per_program, num_warps, num_stages, split)
        for block_t in block_ts
        for tiles_per_program in tiles
        for num_warps in (4, 8)
        # One tile per program has no loop to pipeline.
        for num_stages in ((1, 2, 3) if tiles_per_program > 1 else (1,))
        for split in splits
        if not (split and num_stages == 3)
    ]


def whole_wave_tiles(
    tiles_per_layer: int, num_layers: int, slots: int, max_tiles: int = 32,
    max_idle_share: float = 0.05,
) -> int:
    """Tiles per program for a grid of cdiv(tiles_per_layer, t) × num_layers programs that fills
    its waves of `slots` (SMs × resident programs per SM): the most tiles, up to `max_tiles` (fewer
    programs, fewer atomics), that leave at most `max_idle_share` of the slots of the last wave
    idle, else the fewest idle slots. The forward's grid is a few waves at most, so a part-filled
    last wave can idle a good share of the GPU (H100, 4 programs/SM, 16 tiles of 512: 1.7 waves,
    15% of the slots idle)."""
    if min(tiles_per_layer, num_layers, slots, max_tiles) < 1:
        raise ValueError("tiles_per_layer, num_layers, slots and max_tiles must all be >= 1")

    def idle_share(tiles: int) -> float:
        programs = math.ceil(tiles_per_layer / tiles) * num_layers
        capacity = math.ceil(programs / slots) * slots
        return (capacity - programs) / capacity

    candidates = range(min(max_tiles, tiles_per_layer), 0, -1)
    return next(
        (tiles for tiles in candidates if idle_share(tiles) <= max_idle_share),
        min(candidates, key=idle_share),
    )


def wave_fitted(config: LaunchConfig, fit: Occupancy, num_layers: int, num_tokens: int,
                resources: SMResources = H100_SXM) -> LaunchConfig:
    """`config` with the tiles per program that fill whole waves at its occupancy `fit`."""
    tiles = whole_wave_tiles(
        math.ceil(num_tokens / config.block_t), num_layers, fit.programs_per_sm * resources.num_sms
    )
    return dataclasses.replace(config, tiles_per_program=tiles)


def registers_for(programs_per_sm: int, num_warps: int, resources: SMResources = H100_SXM) -> int:
    """The most registers per thread with which `programs_per_sm` programs of `num_warps` warps
    share an SM's register file (allocated per warp in units of 256), at most 255."""
    per_warp = resources.registers // (programs_per_sm * num_warps)
    allocatable = per_warp // _REGISTER_ALLOCATION_UNIT * _REGISTER_ALLOCATION_UNIT
    return min(255, allocatable // 32)


def register_capped(config: LaunchConfig, facts: CompiledFacts, fit: Occupancy,
                    resources: SMResources = H100_SXM) -> LaunchConfig | None:
    """`config` with `max_registers` at the most that fit one more program per SM than `fit`, or
    None when registers are not what holds the occupancy back (or the cap would be below 16).
    Whether ptxas meets the cap without spilling shows when it is compiled."""
    cap = registers_for(fit.programs_per_sm + 1, facts.num_warps, resources)
    if cap < 16 or cap >= facts.registers:
        return None
    raised = occupancy(dataclasses.replace(facts, registers=cap), 1, resources)
    if raised.programs_per_sm <= fit.programs_per_sm:
        return None
    return dataclasses.replace(config, max_registers=cap)


def launches_for(
    direction: str, logits, segment_ids, num_sequences: int, config: LaunchConfig
) -> list[KernelLaunch]:
    """The `KernelLaunch`es over the logits one direction makes for these inputs (fresh output
    buffers), the one that does most of the work first."""
    import torch

    num_layers, _, num_experts = logits.shape
    if direction == "forward":
        num_sums = num_layers * num_sequences * num_experts
        stats = torch.zeros(num_sums + num_sequences, device=logits.device, dtype=torch.float32)
        return accumulate_launches(
            logits, segment_ids, stats[:num_sums], stats[num_sums:], num_sequences, config
        )
    if direction == "backward":
        grad_factor = torch.zeros(num_layers, num_sequences, num_experts, device=logits.device)
        grad_js = torch.zeros(num_layers, num_sequences, device=logits.device)
        return [backward_launch(
            logits, segment_ids, grad_factor, grad_js, torch.empty_like(logits), config
        )]
    raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")


def relative_error(test, reference) -> float:
    """‖test − reference‖₂ / ‖reference‖₂ in float64."""
    test, reference = test.double(), reference.double()
    return float((test - reference).norm() / reference.norm().clamp_min(1e-30))


def kernel_time_ms(run, reps: int) -> tuple[float, dict[str, float]]:
    """GPU kernel time of one call of `run`: the sum of the durations of the kernels it launches,
    from the profiler (no CPU launch overhead or idle gaps), and the same split by kernel name.
    The L2 cache is flushed before every call."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Flushed with bitwise_not_, an op none of the measured implementations launches, so that its
    # kernel can be told apart by name.
    flush = torch.zeros(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.bitwise_not_()
            run()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or "bitwise_not" in event.key.lower():
            continue
        per_kernel[event.key] = per_kernel.get(event.key, 0.0) + event.self_device_time_total / 1e3 / reps
    return sum(per_kernel.values()), per_kernel
