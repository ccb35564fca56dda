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
