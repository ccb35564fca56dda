"""Launch configs of the routing-JS kernels: compiled facts on any machine, kernel times on a GPU.

    python benchmarks/tune_routing_js.py --shapes qwen3_sft --json tune.json

For each benchmark shape, direction (forward = memset + accumulate + finalize, backward) and
candidate `LaunchConfig` it prints what the compiler made of the launch over the logits (with split
chunk paths: the periodic chunks' launch) — registers and spills per thread, shared memory per
program, resident programs per SM and what limits them, waves of the grid — and, on a GPU, the
kernel time (profiler, L2 flushed), the achieved bandwidth (forward reads the logits once, backward
reads them and writes the gradient) and the largest difference from the default config's output.
Each forward config also brings its wave-fitted sibling (column `wfit`): the same config with the
tiles per program that fill whole waves at its occupancy (`whole_wave_tiles`), since the forward's
grid is only a few waves. Each config whose registers hold its occupancy back also brings its
register-capped sibling (column `maxreg`): the same config with ptxas capped at the registers that
fit one more program per SM (`register_capped`); column `spill` says what the cap cost. Without a
GPU the kernels are compiled for an H100 (sm_90) through Triton's bundled ptxas and nothing is
timed. The default config is marked with `*`.

With --json the file is rewritten after every config, and --resume keeps the rows it already holds
(same shape, direction and config) instead of compiling and timing them again: a sweep cut short,
e.g. by a time limit per command, goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from sara_megatron.io import atomic_open
from routing_js_benchmarking import (
    BENCHMARK_SHAPES,
    H100_SXM,
    NOMINAL_PEAK_BANDWIDTH,
    CompiledFacts,
    benchmark_inputs,
    candidate_configs,
    compile_for_target,
    device_resources,
    kernel_time_ms,
    launches_for,
    occupancy,
    register_capped,
    relative_error,
    wave_fitted,
)
from sara_megatron.kernels.routing_js_triton import (
    launch_config,
    routing_js_backward,
    routing_js_forward,
)


CONFIG_FIELDS = ("block_t", "tiles_per_program", "num_warps", "num_stages", "split_chunk_paths",
                 "max_registers")


def row_key(row) -> tuple:
    return (row["shape"], row["direction"]) + tuple(row.get(field) for field in CONFIG_FIELDS)


def tune_shape(name, shape, directions, device, reps, arch, resources, peak_bandwidth,
               done=None):
    """Yields the rows of one benchmark shape as they are made; `done` maps `row_key`s to rows
    kept from an earlier run."""
    done = done or {}
    layers, sequences, tokens_per_sequence, experts, dtype = shape
    logits, segment_ids, prior = benchmark_inputs(
        layers, sequences, tokens_per_sequence, experts, getattr(torch, dtype), "sb", device
    )
    num_tokens = sequences * tokens_per_sequence
    logits_bytes = logits.numel() * logits.element_size()
    timed = device.type == "cuda"
    for direction in directions:
        default = launch_config(layers, num_tokens, experts, direction)
        if timed:
            _, _, grad_factor = routing_js_forward(logits, segment_ids, prior)
            grad_js = torch.randn(layers, sequences, device=device)

            def run(config, direction=direction):
                if direction == "forward":
                    return routing_js_forward(logits, segment_ids, prior, config=config)[2]
                return routing_js_backward(logits, segment_ids, grad_factor, grad_js, config=config)

            reference = run(default)
        configs = candidate_configs(direction, experts)
        configs = ([default] if default not in configs else []) + configs
        num_candidates = len(configs)
        wave_fits = set()
        # The list grows as it is walked: candidates bring their siblings (wave-fitted in
        # forward, register-capped in both directions), which bring none of their own.
        for index, config in enumerate(configs):
            print(f"{name} {direction} {index + 1}/{len(configs)}: {config}", file=sys.stderr,
                  flush=True)
            # With split chunk paths, the facts are the periodic chunks' launch's.
            launch = launches_for(direction, logits, segment_ids, sequences, config)[0]
            row = {
                "shape": name, "direction": direction, "default": config == default,
                **{field: getattr(config, field) for field in CONFIG_FIELDS},
                "wave_fitted": config in wave_fits,
            }
            kept = done.get(row_key(row))
            if kept is not None:
                row = kept
                facts = CompiledFacts(launch.kernel.__name__, kept["registers"], kept["spill_bytes"],
                                      round(kept["shared_KiB"] * 1024), kept["num_warps"])
            else:
                facts = compile_for_target(launch, arch)
            fit = occupancy(facts, launch.num_programs, resources)
            row.update({
                "registers": facts.registers, "spill_bytes": facts.spill_bytes,
                "shared_KiB": facts.shared_bytes / 1024, "programs": launch.num_programs,
                "programs_per_sm": fit.programs_per_sm, "warps_per_sm": fit.warps_per_sm,
                "limited_by": fit.limited_by, "waves": fit.waves,
            })
            if index < num_candidates:
                siblings = [register_capped(config, facts, fit, resources)]
                # The forward's grid is a few waves: also the tiles per program that fill whole
                # waves at this occupancy (the backward's grid is tens of waves).
                if direction == "forward":
                    fitted = wave_fitted(config, fit, layers, num_tokens, resources)
                    if fitted not in configs:
                        wave_fits.add(fitted)
                    siblings.append(fitted)
                configs += [sibling for sibling in siblings
                            if sibling is not None and sibling not in configs]
            if timed and kept is None:
                milliseconds, _ = kernel_time_ms(lambda config=config: run(config), reps)
                moved = logits_bytes * (1 if direction == "forward" else 2)
                row["ms"] = milliseconds
                row["GBps"] = moved / (milliseconds * 1e-3) / 1e9
                if peak_bandwidth:
                    row["pct_peak"] = 100 * row["GBps"] * 1e9 / peak_bandwidth
                row["rel_diff_vs_default"] = relative_error(run(config), reference)
            yield row


def format_table(rows) -> str:
    columns = [
        ("shape", "{:<10}"), ("direction", "{:<9}"), ("block_t", "{:>7}"),
        ("tiles_per_program", "{:>5}"), ("num_warps", "{:>5}"), ("num_stages", "{:>6}"),
        ("split_chunk_paths", "{!s:>5}"), ("wave_fitted", "{!s:>5}"), ("max_registers", "{!s:>6}"),
        ("registers", "{:>4}"), ("spill_bytes", "{:>5}"), ("shared_KiB", "{:>6.1f}"),
        ("programs", "{:>8}"), ("programs_per_sm", "{:>7}"), ("warps_per_sm", "{:>8}"),
        ("limited_by", "{:<9}"), ("waves", "{:>6.2f}"), ("ms", "{:>7.4f}"), ("GBps", "{:>6.0f}"),
        ("pct_peak", "{:>5.1f}"), ("rel_diff_vs_default", "{:>8.1e}"),
    ]
    headers = {"tiles_per_program": "tiles", "num_warps": "warps", "num_stages": "stages",
               "split_chunk_paths": "split", "wave_fitted": "wfit", "max_registers": "maxreg",
               "registers": "regs", "spill_bytes": "spill", "shared_KiB": "smem_K",
               "programs_per_sm": "prog/SM", "warps_per_sm": "warps/SM", "limited_by": "limit",
               "pct_peak": "%peak", "rel_diff_vs_default": "vs_dflt"}
    present = [(key, fmt) for key, fmt in columns if any(key in row for row in rows)]

    def width(fmt):
        return int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()))

    lines = ["  " + " ".join(headers.get(key, key).rjust(width(fmt)) for key, fmt in present)]
    for row in rows:
        cells = " ".join(fmt.format(row[key]) for key, fmt in present)
        lines.append(("* " if row["default"] else "  ") + cells)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=list(BENCHMARK_SHAPES), choices=list(BENCHMARK_SHAPES))
    parser.add_argument("--directions", nargs="*", default=["forward", "backward"],
                        choices=["forward", "backward"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--arch", type=int, default=None,
                        help="compile for sm_ARCH (default: the GPU's, or 90 without one)")
    parser.add_argument("--json", help="write the rows to this file (after every config)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows the --json file already holds; do only the others")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this tool compiles the kernels for a GPU")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        major, minor = torch.cuda.get_device_capability(device)
        arch = args.arch or 10 * major + minor
        resources = device_resources(device)
        name = torch.cuda.get_device_name(device)
        peak = next((bw for key, bw in NOMINAL_PEAK_BANDWIDTH.items() if key in name), None)
        print(f"{name}: compiled facts for sm_{arch} and kernel times")
    else:
        device, arch, resources, peak = torch.device("cpu"), args.arch or 90, H100_SXM, None
        print(f"no GPU: compiled facts for sm_{arch}, occupancy for {resources.name}; nothing timed")

    done = {}
    if args.resume:
        if not args.json:
            parser.error("--resume needs --json: the file whose rows to keep")
        if os.path.exists(args.json):
            with open(args.json) as handle:
                kept = json.load(handle)
            if kept.get("arch") != arch or kept.get("device") != resources.name:
                parser.error(f"{args.json} holds rows for {kept.get('device')} (sm_{kept.get('arch')}), "
                             f"not {resources.name} (sm_{arch})")
            done = {row_key(row): row for row in kept["rows"]}
            print(f"resuming: {len(done)} rows kept from {args.json}")

    rows = []

    def save(row):
        rows.append(row)
        if args.json:
            # Kept rows this run has not reached (another shape or direction) stay in the file.
            reached = {row_key(done_row) for done_row in rows}
            unreached = [kept_row for key, kept_row in done.items() if key not in reached]
            with atomic_open(args.json) as handle:
                json.dump({"device": resources.name, "arch": arch, "rows": rows + unreached},
                          handle, indent=1)

    for shape_name in args.shapes:
        for row in tune_shape(shape_name, BENCHMARK_SHAPES[shape_name], args.directions, device,
                              args.reps, arch, resources, peak, done=done):
            save(row)
    if device.type == "cuda":
        rows.sort(key=lambda row: (row["shape"], row["direction"], row["ms"]))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
