"""The one launcher of the tests' subprocesses: tools and worker scripts, alone or under torchrun
with N local gloo processes. One thread per process (two ranks share a small CPU box) and no
library warnings in the captured output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sara_megatron.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def torchrun_command(script, *args, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` of `script` (a path, or one relative to the repository)
    with `nproc` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), str(REPO / script), *map(str, args)]


def run(cmd, cwd, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """Run `cmd` with the tests' environment and return it, whatever its exit code (a hang shows
    as subprocess.TimeoutExpired)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def run_checked(cmd, cwd, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """`run`, raising with the tail of its output when it fails."""
    proc = run(cmd, cwd, timeout, **popen)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


class CaseLaunch:
    """One torchrun launch of a worker that runs many test cases in turn (the processes and their
    imports start once) and writes <out_dir>/<case>.json as each case ends. Each parametrized test
    reads its own case; a case that left no file fails its test with the launch's output, while
    the cases before it still assert."""

    def __init__(self, script, *args, out_dir: Path, nproc: int = 2, timeout: int = 600):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = run(torchrun_command(script, *args, "--out-dir", self.out_dir, nproc=nproc),
                        self.out_dir, timeout)

    def result(self, case: str) -> dict:
        import json

        import pytest

        path = self.out_dir / f"{case}.json"
        if not path.is_file():
            pytest.fail(f"case {case} left no result; the launch exited {self.proc.returncode}:\n"
                        f"{self.proc.stdout[-4000:]}\n{self.proc.stderr[-8000:]}")
        return json.loads(path.read_text())
