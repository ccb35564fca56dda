"""The one launcher of the tools in subprocesses, as a user runs them: the demo's and the
experiment's steps, and the tests' tool runs.

A tool runs as `python -m sara_megatron.cli.<tool>` with this interpreter (`sys.executable`), so
it works from an installed copy and from a virtual environment that is not on the PATH; a
multi-rank tool runs under torchrun (`python -m torch.distributed.run`, or
`sara_megatron.torchrun`) with `-m` and the same module.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

CLI_PACKAGE = "sara_megatron.cli"
TORCHRUN = "torch.distributed.run"


def tool_module(tool: str) -> str:
    """The module that runs `tool`.

    Args:
        tool: a tool's name, e.g. "shard_corpus" (as in `tools/shard_corpus.py`).

    Returns:
        Its dotted module name, e.g. "sara_megatron.cli.shard_corpus".

    Raises:
        ValueError: `tool` is not a plain name (a path or a file name was given).
    """
    if not tool.isidentifier():
        raise ValueError(f"a tool's name, such as 'train', is needed; got {tool!r}")
    return f"{CLI_PACKAGE}.{tool}"


def torchrun_prefix(nproc: int, launcher: str = TORCHRUN,
                    python: Optional[str] = None) -> list[str]:
    """torchrun with `nproc` local processes, before the script or `-m module`. `--standalone`:
    the launcher's store binds a port the OS picks, which the workers share; a port found free
    beforehand could be taken by a concurrent run before the launcher binds it.

    Args:
        nproc: processes on this machine (>= 1).
        launcher: the module that launches: torch's torchrun, or "sara_megatron.torchrun".
        python: the interpreter; default this one.

    Returns:
        `[python, "-m", launcher, "--standalone", "--nproc-per-node", nproc]`.
    """
    return [python or sys.executable, "-m", launcher, "--standalone", "--nproc-per-node",
            str(nproc)]


def tool_command(tool: str, args: Iterable = (), nproc: int = 0, launcher: str = TORCHRUN,
                 python: Optional[str] = None) -> list[str]:
    """The command line of a tool run.

    Args:
        tool: the tool's name, e.g. "train".
        args: its arguments (each turned into a string).
        nproc: 0 runs one process without a launcher; N >= 1 runs N ranks under `launcher`.
        launcher: see `torchrun_prefix`.
        python: the interpreter; default this one.

    Returns:
        The argument list for `subprocess`.
    """
    module = tool_module(tool)
    if nproc:
        cmd = [*torchrun_prefix(nproc, launcher, python), "-m", module]
    else:
        cmd = [python or sys.executable, "-m", module]
    return cmd + [str(a) for a in args]


# A world of one without a launcher: what torchrun would set for a single process.
def single_rank_environment() -> dict[str, str]:
    """The launcher variables of one process that is the whole job. No rendezvous address: the
    process's store binds a port the OS picks (`distributed.initialize_distributed`), so runs
    started side by side cannot race for one found free beforehand.

    Returns:
        RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE.
    """
    return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def tool_environment(extra: Optional[Mapping[str, str]] = None, unset: Sequence[str] = (),
                     threads: Optional[str] = None) -> dict[str, str]:
    """The environment of a tool run: this process's, with one thread per process unless
    OMP_NUM_THREADS is set (ranks share the CPU), and no library warnings in the output.

    Args:
        extra: variables to set on top.
        unset: variables to leave out (e.g. OPENAI_API_KEY: a user's real key is not sent to a
            local server).
        threads: OMP_NUM_THREADS to force; default the caller's, else 1.

    Returns:
        A new environment mapping.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = threads or os.environ.get("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    for name in unset:
        env.pop(name, None)
    return env


@dataclasses.dataclass
class ToolRun:
    """A finished tool run.

    Attributes:
        returncode: the exit status.
        seconds: its wall time.
        cpu_seconds: user + system CPU time of the process and the processes it waited for
            (the ranks under torchrun); it does not grow when other programs share the cores.
        log: the file holding its output (stdout and stderr).
    """

    returncode: int
    seconds: float
    cpu_seconds: float
    log: Path

    def tail(self, chars: int = 4000) -> str:
        """The end of its output.

        Args:
            chars: The most characters to return.
        """
        return self.log.read_text(errors="replace")[-chars:]


def run_tool(tool: str, args: Iterable, cwd: Path, log: Path, nproc: int = 0,
             env: Optional[Mapping[str, str]] = None) -> ToolRun:
    """Run a tool in a subprocess (see `tool_command`), its output to `log`, and wait for it.

    Args:
        tool: the tool's name, e.g. "shard_corpus".
        args: its arguments.
        cwd: the folder it runs in (relative paths in `args` are from there).
        log: the file its stdout and stderr go to (its folder is made).
        nproc: 0 for one process, else N ranks under torchrun.
        env: its environment; default `tool_environment()`.

    Returns:
        The run, whatever its exit status. Ctrl-C here kills the tool before it propagates.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(tool_command(tool, args, nproc), cwd=cwd,
                                env=dict(env) if env is not None else tool_environment(),
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return ToolRun(proc.returncode, time.time() - started, usage.ru_utime + usage.ru_stime, log)
