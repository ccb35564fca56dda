"""The tests' subprocesses: tools (through `sara_megatron.tool_runner`, the launcher the demo and
the experiment use) and worker scripts, alone or under torchrun with N local gloo processes. One
thread per process (two ranks share a small CPU box) and no library warnings in the captured
output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sara_megatron.tool_runner import tool_command, tool_environment, torchrun_prefix

REPO = Path(__file__).resolve().parents[1]



def torchrun_command(script, *args, nproc: int = 2,
                     launcher: str = "torch.distributed.run") -> list[str]:
    """`python -m torch.distributed.run` (or `launcher`, e.g. "sara_megatron.torchrun") of
    `script` with `nproc` local processes on a free port. `script`: a worker script (a path, or
    one relative to the repository), or a tool's name ("train": `-m sara_megatron.cli.train`)."""
    if isinstance(script, str) and script.isidentifier():
        return tool_command(script, args, nproc=nproc, launcher=launcher)
    return [*torchrun_prefix(nproc, launcher), str(REPO / script), *map(str, args)]


def tool(name: str, *args, nproc: int = 0, launcher: str = "torch.distributed.run") -> list[str]:
    """`tool_command` with the arguments spread: the command of tool `name` (e.g. "train"), on
    `nproc` ranks under `launcher` when nproc >= 1."""
    return tool_command(name, args, nproc=nproc, launcher=launcher)


def environment(**extra: str) -> dict:
    """The tests' subprocess environment: this one's, one thread per process, no library
    warnings, and `extra`."""
    return tool_environment(extra, threads="1")


def run(cmd, cwd, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """Run `cmd` with the tests' environment and return it, whatever its exit code (a hang shows
    as subprocess.TimeoutExpired)."""
    env = environment()
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


# Launches started early: a test module registers a long subprocess under the name of the fixture
# that needs it (at import, i.e. collection); conftest's `early_launches` starts every registered
# launch whose fixture a selected test uses when the session's first test starts, so it runs beside
# the tests before its own on a core they leave idle, and its fixture waits for it.
EARLY_LAUNCHES: dict = {}


def early_launch(fixture: str):
    """Register `command(folder) -> {"cmd", "cwd", "timeout"[, "env"]}` (`Background`'s arguments)
    to start early for `fixture`; `folder` is a new temporary folder of the session."""

    def register(command):
        EARLY_LAUNCHES[fixture] = command
        return command

    return register


class Background:
    """`run(cmd, cwd, timeout)` started now and collected later: output to files (a pipe nobody
    reads would fill), the timeout counted from the start, its own process group (killed with its
    children when the session ends first)."""

    def __init__(self, cmd, cwd, timeout: int, folder: Path, env: dict | None = None):
        import tempfile
        import time

        self.cmd, self.folder, self.timeout = list(map(str, cmd)), Path(folder), timeout
        self.started = time.monotonic()
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        env = environment(**(env or {}))
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=self._out,
                                     stderr=self._err, start_new_session=True)
        self._result = None

    def wait(self) -> subprocess.CompletedProcess:
        """The finished process, as `run` returns it (a hang raises subprocess.TimeoutExpired)."""
        import time

        if self._result is None:
            left = self.timeout - (time.monotonic() - self.started)
            try:
                self.proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                self.stop()
                raise
            self._result = subprocess.CompletedProcess(self.cmd, self.proc.returncode,
                                                       self._read(self._out), self._read(self._err))
        return self._result

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    @staticmethod
    def _read(file) -> str:
        file.seek(0)
        return file.read().decode(errors="replace")


def record_micro_batches(trainer) -> list:
    """Make `trainer` hand every micro-batch it takes to the returned list as well (in order), so
    a test can read what a step trained on."""
    seen = []
    batches = trainer.state.batches

    def recording():
        for mb in batches:
            seen.append(mb)
            yield mb

    trainer.state.batches = recording()
    return seen
