"""`benchmarks/gpu_check.py` without a GPU: every section runs at tiny shapes on the CPU and
writes the same keys, with finite, sane figures (a smoke test of the command; docs/gpu.md). And
`import sara_megatron.training` stays free of what training does not need (a bare GPU machine
brings only megatron-core and a few pure-Python wheels)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "kernel_contract", "kernel_benchmark", "training_step",
            "numeric_check", "transformer_engine")

pytestmark = pytest.mark.multiprocess


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The Markdown table comes last.
    lines = proc.stdout.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table and lines[-1].startswith("|") and "| section | measure |" in table[0]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["on_gpu"] is False and report["machine"].endswith("-core CPU")
    for key in (*SECTIONS, "targets"):
        assert key in report, key
        assert not {"error", "skipped"} & set(report[key]), (key, report[key])

    env_ = report["environment"]
    assert _finite_positive(env_["copy_bandwidth"]["GBps"])
    assert _finite_positive(env_["bf16_matmul"]["TFLOPs"])
    assert env_["transformer_engine"]["version"] == "absent" and env_["transformer_engine"]["why"]

    contract = report["kernel_contract"]
    assert contract["all_pass"] and {c["dtype"] for c in contract["cases"]} == {
        "float32", "bfloat16"}
    assert any(c["empty_sequences"] for c in contract["cases"])
    assert {c["layout"] for c in contract["cases"]} >= {"sb", "packed", "shuffled", "all_padding"}
    assert contract["max_js_rel_error"]["float32"] < 1e-5
    assert contract["max_grad_rel_error"]["bfloat16"] < 2e-3

    bench = report["kernel_benchmark"]
    assert {(r["shape"], r["impl"]) for r in bench["rows"]} >= {
        ("qwen3_30b_a3b", "fused"), ("qwen3_30b_a3b", "eager"), ("phi35_moe", "fused")}
    for row in bench["rows"]:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_GBps", "fwd_bwd_copy_share"):
            assert _finite_positive(row[key]), (row, key)
        assert row["fwd_bwd_bytes"] == 3 * row["fwd_bytes"]
    whole = bench["whole_step"]
    assert _finite_positive(whole["one_launch_ms"]) and _finite_positive(whole["per_layer_ms"])

    for name in ("qwen3_30b_a3b", "phi35_moe"):
        run = report["training_step"][name]
        assert set(run["runs"]) == {f"{layout}/{objective}" for layout in ("packed", "padded")
                                    for objective in ("sara", "fft", "plain")}
        for key, r in run["runs"].items():
            assert _finite_positive(r["step_s"]) and _finite_positive(r["real_tokens_per_s"])
            assert _finite_positive(r["tflops_per_gpu"]) and 0 < r["fill_rate"] <= 1
            assert math.isfinite(r["first_step"]["ce"])
            # FFT (lambda_JS 0) computes and logs JS on the same code path; plain has none.
            assert (r["first_step"]["js"] > 0) == (not key.endswith("plain"))
        packed, padded = run["runs"]["packed/sara"], run["runs"]["padded/sara"]
        assert packed["fill_rate"] > padded["fill_rate"]
        assert _finite_positive(run["packed_sara_over_fft"])
        assert _finite_positive(run["packed_over_padded_tokens_per_s"])

    numeric = report["numeric_check"]
    assert numeric["passes"], numeric
    assert math.isfinite(numeric["cpu"]["ce"]) and numeric["cpu"]["grad_norm"] > 0

    te = report["transformer_engine"]
    assert te["ran"] is False and te["why"] and te["packed_comparison"]
    # Nothing is judged against a target on a CPU.
    assert all(item["met"] is None for item in report["targets"].values())


def test_importing_training_loads_nothing_it_does_not_need():
    """The bare GPU machine has no openai, datasets, lingua or matplotlib: they load where they
    are used (construction, evaluation, analysis), never with the trainer."""
    code = ("import sys, sara_megatron.training\n"
            "heavy = ('openai', 'datasets', 'lingua', 'matplotlib')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
