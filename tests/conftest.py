import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun(tmp_path):
    """Run a worker script under torchrun with N local processes; fail with its output."""

    def run(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
            str(REPO / script), *args,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            pytest.fail(
                f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )

    return run


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state on a one-process gloo group (TP=EP=PP=1), CPU compat applied."""
    from sara_megatron.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    yield


def pytest_sessionfinish(session, exitstatus):
    from sara_megatron.distributed import destroy_distributed

    try:
        destroy_distributed()
    except Exception:  # noqa: BLE001 - a failed teardown must not mask the test result
        pass
