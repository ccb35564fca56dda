"""Launcher environments, the CPU compatibility layer's scope, and the routing report tool."""

import json
import subprocess
import sys

import pytest

from sara_megatron.distributed import read_launcher_env


def _clear(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
              "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)


def test_torchrun_env(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    monkeypatch.setenv("MASTER_PORT", "29400")
    env = read_launcher_env()
    assert (env.rank, env.local_rank, env.world_size) == (5, 5, 16)
    assert (env.master_addr, env.master_port) == ("node-a", 29400)


def test_slurm_env(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = read_launcher_env()
    assert (env.rank, env.local_rank, env.world_size) == (9, 1, 16)
    assert env.master_addr == "gpu017"
    assert env.master_port == 20000 + 123456 % 10000


def test_single_process_env(monkeypatch):
    _clear(monkeypatch)
    env = read_launcher_env()
    assert (env.rank, env.world_size) == (0, 1) and env.master_port > 0


def test_cpu_compat_never_applies_with_cuda():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = torch.cuda.current_device\n"
        "from sara_megatron.compat import apply_cpu_compat\n"
        "assert apply_cpu_compat() is False\n"
        "assert torch.cuda.current_device is before\n"
        "import megatron.core.tensor_parallel.random as r\n"
        "assert r._CUDA_RNG_STATE_TRACKER is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("layout", [["--ep", "2"], ["--tp", "2"]])
def test_routing_report_tool(torchrun, tmp_path, layout):
    out = tmp_path / "rows.json"
    torchrun("tools/routing_report.py", "--preset", "qwen3_moe_tiny", *layout,
             "--seq-length", "16", "--json", str(out))
    rows = json.loads(out.read_text())
    # 4 layers × 2 ranks × 2 sequences when EP=2 (DP=2); TP=2 has one data-parallel rank.
    sequences = 4 if layout[0] == "--ep" else 2
    assert len(rows) == 4 * sequences
    assert {r["layer"] for r in rows} == {0, 1, 2, 3}
    # The last sequence of each rank is right-padded by a quarter: 12 valid tokens of 16.
    assert sorted({r["tokens"] for r in rows}) == [12, 16]
    for r in rows:
        assert 0 < r["entropy"] <= __import__("math").log(8) + 1e-6
