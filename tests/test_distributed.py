"""Launcher environments, the CPU compatibility layer's scope, and the routing report tool."""

import json
import subprocess
import sys

import pytest

from sara_megatron.distributed import ParallelConfig, _first_host, read_launcher_env
from sara_megatron.tool_runner import single_rank_environment


def _clear(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(k, raising=False)


def _sbatch_batch_step(monkeypatch, ntasks: str = "16") -> None:
    """What a batch script itself sees (sbatch, outside srun): job variables, no step ones."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", ntasks)
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")


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
    """A task srun started: rank from SLURM_PROCID, world size from the step."""
    _clear(monkeypatch)
    _sbatch_batch_step(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    env = read_launcher_env()
    assert (env.rank, env.local_rank, env.world_size) == (9, 1, 16)
    assert env.master_addr == "gpu017"
    assert env.master_port == 20000 + 123456 % 10000


def test_slurm_step_smaller_than_the_job(monkeypatch):
    """`srun -n 4 -N 1 -w gpu018` inside a 16-task job (srun --preserve-env keeps the job's
    SLURM_NTASKS): 4 processes, rendezvous on the step's first node."""
    _clear(monkeypatch)
    _sbatch_batch_step(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu018")
    env = read_launcher_env()
    assert (env.rank, env.world_size, env.master_addr) == (3, 4, "gpu018")


def test_sbatch_batch_script_is_a_single_process(monkeypatch):
    """A tool run straight from a batch script (no srun) sees SLURM_PROCID=0 and SLURM_NTASKS=16;
    taking that for rank 0 of 16 would wait forever for 15 ranks that never start."""
    _clear(monkeypatch)
    _sbatch_batch_step(monkeypatch)
    env = read_launcher_env()
    assert (env.rank, env.world_size) == (0, 1)
    ParallelConfig().validate_world(env.world_size)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu[017-018]", "gpu017"),
        ("rack1-node[01-02]-ib", "rack1-node01-ib"),
        ("a[1-2]b[3-4]", "a1b3"),
        ("node[01-03,07]", "node01"),
        ("n1,n2", "n1"),
        ("node[07,01-03],login1", "node07"),
        ("single", "single"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert _first_host(nodelist) == first


def test_single_process_env(monkeypatch):
    """One process without a rendezvous address (alone, or torchrun's variables for a world of
    one as the experiment sets them) leaves the port to its store: port 0, bound by the OS when
    the process group starts (every `single_rank` test starts one so)."""
    _clear(monkeypatch)
    env = read_launcher_env()
    assert (env.rank, env.world_size, env.master_port) == (0, 1, 0)
    for name, value in single_rank_environment().items():
        monkeypatch.setenv(name, value)
    env = read_launcher_env()
    assert (env.rank, env.world_size, env.master_port) == (0, 1, 0)


@pytest.mark.multiprocess
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


@pytest.fixture(scope="module")
def checkpoint_reports(sara_data, tmp_path_factory):
    """tools/routing_report.py on one checkpoint at one rank and at EP=2 (two ranks): its rows by
    (layer, sequence). The EP=2 run also serves as the tool's EP=2 case below."""
    import launch

    folder = tmp_path_factory.mktemp("routing_report")
    rows = {}
    for name, layout, nproc in (("one", [], 1), ("ep2", ["--ep", "2"], 2)):
        out = folder / f"{name}.json"
        launch.run_checked(launch.torchrun_command(
            "routing_report", "--preset", "qwen3_moe_tiny", "--checkpoint",
            sara_data["checkpoint"], *layout, "--seq-length", "16", "--json", out, nproc=nproc),
            folder, timeout=300)
        rows[name] = json.loads(out.read_text())
    return rows


# EP=2 reads the checkpoint run above (a model loaded from disk); TP=2 with a layer selection
# launches its own run on the preset's random initialisation.
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--ep", "2"], ["--tp", "2", "--layers", "1,3"]],
                         ids=["ep2_checkpoint", "tp2_layers"])
def test_routing_report_tool(request, tmp_path, layout):
    if layout[0] == "--ep":
        rows = request.getfixturevalue("checkpoint_reports")["ep2"]
    else:
        out = tmp_path / "rows.json"
        request.getfixturevalue("torchrun")(
            "routing_report", "--preset", "qwen3_moe_tiny", *layout, "--seq-length",
            "16", "--json", str(out))
        rows = json.loads(out.read_text())
    # 4 layers (or the 2 asked for) × 2 ranks × 2 sequences when EP=2 (DP=2); TP=2 has one
    # data-parallel rank.
    sequences = 4 if layout[0] == "--ep" else 2
    layers = {0, 1, 2, 3} if "--layers" not in layout else {1, 3}
    assert len(rows) == len(layers) * sequences
    assert {r["layer"] for r in rows} == layers
    # The last sequence of each rank is right-padded by a quarter: 12 valid tokens of 16.
    assert sorted({r["tokens"] for r in rows}) == [12, 16]
    for r in rows:
        assert 0 < r["entropy"] <= __import__("math").log(8) + 1e-6


def test_routing_report_of_a_checkpoint_does_not_depend_on_the_layout(checkpoint_reports):
    rows = {name: {(r["layer"], r["sequence"]): r for r in report}
            for name, report in checkpoint_reports.items()}
    # One rank routes data-parallel rank 0's sequences; EP=2 (DP=2) routes those and rank 1's.
    assert set(rows["one"]) < set(rows["ep2"])
    for key, row in rows["one"].items():
        other = rows["ep2"][key]
        assert row["tokens"] == other["tokens"]
        assert [e for e, _ in row["top"]] == [e for e, _ in other["top"]], key
        assert [v for _, v in row["top"]] == pytest.approx([v for _, v in other["top"]], abs=1e-6)
        assert row["entropy"] == pytest.approx(other["entropy"], abs=1e-6), key


@pytest.mark.parametrize("args, message", [
    (["--layers", "99"], "outside the model's 0..3"),
    (["--layers", "1-"], "bad layer selection"),
    (["--seq-length", "0"], "--seq-length must be >= 1"),
])
def test_routing_report_refuses_bad_arguments(args, message, monkeypatch, capsys):
    """The tool's own argument parsing, in this process: status 2 and the message, before any
    process group or model exists."""
    import importlib

    tool = importlib.import_module("sara_megatron.cli.routing_report")
    monkeypatch.setattr(sys, "argv", ["routing_report.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err[-2000:]
