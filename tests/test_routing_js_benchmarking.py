"""Compiled facts, occupancy and candidate configs of the routing-JS kernels (no GPU needed).

The kernels are compiled for sm_90 through Triton's bundled ptxas, so these tests run with the
real compiler, not the interpreter: they live in a process without TRITON_INTERPRET=1 and are
skipped when the whole run sets it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sara_megatron.kernels.routing_js_triton import LaunchConfig, launch_config

ROOT = Path(__file__).resolve().parents[1]
# The helpers live beside the benchmark scripts that use them, outside the package.
sys.path.insert(0, str(ROOT / "benchmarks"))
from routing_js_benchmarking import (  # noqa: E402
    BENCHMARK_SHAPES,
    H100_SXM,
    CompiledFacts,
    SMResources,
    benchmark_inputs,
    candidate_configs,
    compile_for_target,
    compile_launch,
    launches_for,
    occupancy,
    register_capped,
    registers_for,
    wave_fitted,
    whole_wave_tiles,
)

compiled_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="compile_for_target needs the compiler, not Triton's interpreter",
)


def _facts(registers, shared_bytes, num_warps):
    return CompiledFacts("k", registers=registers, spill_bytes=0, shared_bytes=shared_bytes,
                         num_warps=num_warps)


def test_occupancy_matches_the_cuda_occupancy_rules():
    # 128 registers × 128 threads: 16384 of an SM's 65536 registers -> 4 programs.
    fit = occupancy(_facts(128, 0, 4), num_programs=896)
    assert (fit.programs_per_sm, fit.warps_per_sm, fit.limited_by) == (4, 16, "registers")
    assert fit.waves == pytest.approx(896 / (4 * 132))
    # Registers go per warp in units of 256: 40 per thread = 1280 per warp -> 12 programs of 4 warps.
    assert occupancy(_facts(40, 0, 4), 1).programs_per_sm == 12
    # 41 per thread rounds to 1536 per warp -> 10 programs.
    assert occupancy(_facts(41, 0, 4), 1).programs_per_sm == 10
    # Shared memory: 100 KiB + 1 KiB reserved per program -> 2 programs in 228 KiB.
    fit = occupancy(_facts(32, 100 * 1024, 4), 1)
    assert (fit.programs_per_sm, fit.limited_by) == (2, "shared")
    # Few registers, no shared memory: 64 warps per SM -> 16 programs of 4 warps.
    fit = occupancy(_facts(16, 0, 4), 1)
    assert (fit.programs_per_sm, fit.limited_by) == (16, "warps")
    # One warp per program: at most 32 resident programs.
    assert occupancy(_facts(16, 0, 1), 1).limited_by == "programs"
    small = SMResources("small", num_sms=2, registers=8192)
    with pytest.raises(ValueError, match="does not fit"):
        occupancy(_facts(255, 0, 8), 1, small)


def _idle_share(tiles_per_layer, num_layers, slots, tiles):
    programs = -(-tiles_per_layer // tiles) * num_layers
    capacity = -(-programs // slots) * slots
    return (capacity - programs) / capacity


def test_whole_wave_tiles_fill_the_last_wave():
    # Qwen3 SFT forward: 512 tiles of 32 tokens per layer, 28 layers, on 132 SMs.
    for programs_per_sm in (3, 4, 5, 7):
        slots = 132 * programs_per_sm
        tiles = whole_wave_tiles(512, 28, slots)
        assert _idle_share(512, 28, slots, tiles) <= 0.05
        # The most tiles per program that does so.
        assert all(_idle_share(512, 28, slots, more) > 0.05 for more in range(tiles + 1, 33))
    # 4 programs/SM: 16 tiles per program leave 15% of the second wave's slots idle; 30 tiles fill
    # one wave but for 24 of 528 slots.
    assert _idle_share(512, 28, 528, 16) == pytest.approx(0.15, abs=0.01)
    assert whole_wave_tiles(512, 28, 528) == 30
    # Nothing fits within the bound: the fewest idle slots, never more tiles than a layer has.
    assert whole_wave_tiles(3, 1, 1000) == 1
    assert whole_wave_tiles(3, 1, 1000, max_idle_share=1.0) == 3
    with pytest.raises(ValueError, match=">= 1"):
        whole_wave_tiles(0, 28, 528)


def test_wave_fitted_keeps_the_config_but_its_tiles():
    config = LaunchConfig(32, 16, num_warps=4, num_stages=2, split_chunk_paths=True)
    fit = occupancy(_facts(112, 32 * 1024, 4), num_programs=896)
    assert fit.programs_per_sm == 4
    fitted = wave_fitted(config, fit, num_layers=28, num_tokens=16384)
    assert fitted == dataclasses.replace(config, tiles_per_program=30)


def test_register_cap_fits_one_more_program():
    # 4 warps: 5 programs need 65536 / 20 = 3276 registers per warp, 3072 in units of 256 -> 96.
    assert registers_for(5, 4) == 96
    assert registers_for(1, 1) == 255  # a thread never gets more than 255
    config = LaunchConfig(32, 16, num_warps=4, num_stages=1, split_chunk_paths=True)
    facts = _facts(104, 40 * 1024, 4)
    fit = occupancy(facts, 896)
    capped = register_capped(config, facts, fit)
    assert capped == dataclasses.replace(config, max_registers=96)
    assert occupancy(_facts(96, 40 * 1024, 4), 896).programs_per_sm == fit.programs_per_sm + 1
    # Shared memory holds it back (100 KiB per program: 2 per SM whatever the registers): no cap.
    facts = _facts(96, 100 * 1024, 4)
    assert register_capped(config, facts, occupancy(facts, 896)) is None
    with pytest.raises(ValueError, match="max_registers"):
        dataclasses.replace(config, max_registers=8)


@pytest.mark.parametrize("shape_name", list(BENCHMARK_SHAPES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_candidates_are_valid_and_distinct(shape_name, direction):
    layers, sequences, tokens_per_sequence, experts, _ = BENCHMARK_SHAPES[shape_name]
    candidates = candidate_configs(direction, experts)
    assert len(candidates) == len(set(candidates)) >= 20
    assert all(isinstance(config, LaunchConfig) for config in candidates)
    # The tuned default is among the candidates, so a sweep compares against it.
    assert launch_config(layers, sequences * tokens_per_sequence, experts, direction) in candidates
    # Only the forward has chunk paths to split; it is timed both ways.
    splits = {config.split_chunk_paths for config in candidates}
    assert splits == ({False, True} if direction == "forward" else {False})
    with pytest.raises(ValueError, match="direction"):
        candidate_configs("sideways", experts)


def test_benchmark_inputs_layouts():
    logits, ids, prior = benchmark_inputs(2, 3, 5, 16, torch.bfloat16, "sb", "cpu")
    assert logits.shape == (2, 15, 16) and logits.dtype == torch.bfloat16
    assert ids.tolist() == [0, 1, 2] * 5
    torch.testing.assert_close(prior.sum(-1), torch.ones(2, 3))
    _, packed, _ = benchmark_inputs(2, 3, 5, 16, torch.bfloat16, "packed", "cpu")
    assert packed.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(ValueError, match="layout"):
        benchmark_inputs(2, 3, 5, 16, torch.bfloat16, "diagonal", "cpu")


@compiled_only
def test_compile_for_target_reports_the_launch_as_specialised():
    logits, ids, _ = benchmark_inputs(2, 4, 256, 128, torch.bfloat16, "sb", "cpu")
    config = LaunchConfig(block_t=32, tiles_per_program=4, num_warps=4, num_stages=1)
    (forward,) = launches_for("forward", logits, ids, 4, config)
    assert forward.num_programs == (1024 // (32 * 4)) * 2
    facts = compile_for_target(forward)
    assert facts.kernel == "_accumulate_kernel" and facts.num_warps == 4
    assert 32 <= facts.registers <= 255 and facts.spill_bytes == 0
    # The segment sums go through tensor cores, whose operands are staged in shared memory.
    assert facts.shared_bytes > 0
    # Compiled alone, the periodic chunks' path needs fewer registers than all paths together.
    periodic, other = launches_for(
        "forward", logits, ids, 4, dataclasses.replace(config, split_chunk_paths=True)
    )
    assert compile_for_target(periodic).registers < facts.registers
    assert other.grid == periodic.grid == forward.grid

    (backward,) = launches_for("backward", logits, ids, 4, config)
    backward = compile_for_target(backward)
    assert backward.kernel == "_backward_kernel" and backward.shared_bytes == 0
    wide = compile_for_target(
        launches_for("backward", logits, ids, 4, LaunchConfig(32, 1, num_warps=8, num_stages=1))[0]
    )
    # Twice the threads for the same tile: fewer registers each.
    assert wide.num_warps == 8 and wide.registers < backward.registers


@compiled_only
def test_register_cap_reaches_ptxas_and_spills_show():
    logits, ids, _ = benchmark_inputs(2, 4, 256, 128, torch.bfloat16, "sb", "cpu")
    config = LaunchConfig(32, 4, num_warps=4, num_stages=1, split_chunk_paths=True)
    (periodic, _) = launches_for("forward", logits, ids, 4, config)
    free = compile_for_target(periodic)
    assert free.registers > 64 and free.spill_bytes == 0
    # ptxas puts what does not fit the cap on the stack, which the facts count as spills.
    (tight, _) = launches_for("forward", logits, ids, 4, dataclasses.replace(config, max_registers=32))
    tight = compile_for_target(tight)
    assert tight.registers <= 32 and tight.spill_bytes > 0


@compiled_only
def test_compiled_kernels_take_exponentials_with_one_ftz_instruction_and_fuse_multiply_adds(
    monkeypatch,
):
    # ex2.approx without .ftz becomes a range test, two multiplies and the MUFU.EX2 on sm_90;
    # with .ftz, the MUFU.EX2 alone.
    # Multiply-add contraction is pinned on, even where Triton's default turns it off (the env
    # variable below; the default in Triton 3.10): uncontracted PTX spells mul.rn / add.rn.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    logits, ids, _ = benchmark_inputs(2, 4, 256, 128, torch.bfloat16, "sb", "cpu")
    for direction in ("forward", "backward"):
        config = LaunchConfig(block_t=32, tiles_per_program=2, num_warps=4, num_stages=2)
        for launch in launches_for(direction, logits, ids, 4, config):
            ptx = compile_launch(launch).asm["ptx"]
            assert "ex2.approx.ftz.f32" in ptx, direction
            assert "ex2.approx.f32" not in ptx, direction
            assert "mul.rn.f32" not in ptx and "add.rn.f32" not in ptx, direction


@pytest.mark.multiprocess
@compiled_only
def test_tune_tool_reports_compiled_facts_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the tool also times every candidate")
    out = tmp_path / "tune.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tune_routing_js.py"), "--shapes", "phi_sft",
         "--directions", "backward", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert "nothing timed" in completed.stdout
    rows = json.loads(out.read_text())["rows"]
    defaults = [row for row in rows if row["default"]]
    assert len(defaults) == 1 and defaults[0]["direction"] == "backward"
    for row in rows:
        assert row["programs_per_sm"] >= 1 and row["registers"] > 0
        assert row["waves"] == pytest.approx(
            row["programs"] / (row["programs_per_sm"] * H100_SXM.num_sms)
        )
        assert "ms" not in row
    # Register-capped siblings come with their candidates, capped below what ptxas chose alone.
    capped = [row for row in rows if row["max_registers"] is not None]
    assert capped and all(row["registers"] <= row["max_registers"] for row in capped)
    for row in capped:
        uncapped = [other for other in rows if other["max_registers"] is None and all(
            other[key] == row[key] for key in ("block_t", "tiles_per_program", "num_warps",
                                               "num_stages", "split_chunk_paths"))]
        assert len(uncapped) == 1 and uncapped[0]["registers"] > row["max_registers"]

    # A second run with --resume keeps every row instead of compiling it again.
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tune_routing_js.py"), "--shapes", "phi_sft",
         "--directions", "backward", "--json", str(out), "--resume"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"resuming: {len(rows)} rows kept" in completed.stdout
    assert json.loads(out.read_text())["rows"] == rows
