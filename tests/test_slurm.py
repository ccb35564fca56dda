"""The project's sbatch recipe under a real SLURM: a single-host cluster (tests/slurm_cluster.py)
runs `examples/slurm_qwen3_30b_a3b.sbatch` unchanged, set only through its documented variables
(IMAGE=none: no container; PYTHON; CONFIG; arguments for tools/train.py) and sbatch's own options
for the size of the job. Two ranks of the tiny config on mock data train 3 steps, and their
losses are plain torchrun's."""

from __future__ import annotations

import json
import sys

import pytest

import launch
import slurm_cluster
from conftest import REPO
from sara_megatron.distributed import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

RECIPE = "examples/slurm_qwen3_30b_a3b.sbatch"
STEPS = 3
TRAIN_ARGS = ["--set", "data.mock=true", "--set", f"optim.train_steps={STEPS}",
              "--set", "logging.log_interval=1"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm_cluster.ensure_installed()
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def test_sbatch_recipe_trains_like_torchrun(cluster, tmp_path):
    log = tmp_path / "slurm.jsonl"
    out = tmp_path / "job.out"
    proc = cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=10", f"--output={out}", RECIPE, *TRAIN_ARGS, "--set", f"logging.json_log={log}",
        cwd=REPO,
        env=launch.environment(IMAGE="none", PYTHON=sys.executable,
                               CONFIG="examples/tiny_cpu_sara.yaml", MASTER_PORT=str(free_port())),
    )
    job_output = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + job_output[-4000:]
    # Both ranks came up through srun's variables (EP=2 over the two tasks).
    assert "rank 0/2" in job_output and "ep=2" in job_output, job_output[-4000:]
    slurm = _records(log)
    assert [r["step"] for r in slurm] == list(range(1, STEPS + 1))

    reference = tmp_path / "torchrun.jsonl"
    launch.run_checked(launch.torchrun_command(
        "tools/train.py", "--config", "examples/tiny_cpu_sara.yaml", *TRAIN_ARGS,
        "--set", f"logging.json_log={reference}"), REPO)
    for a, b in zip(slurm, _records(reference), strict=True):
        for key in ("ce", "lb", "js", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)

