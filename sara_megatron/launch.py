"""What every tool's entry point does around its work: logging, and failing fast.

A rank that raises must not go on to a clean shutdown: `destroy_distributed()` waits in a barrier
for ranks that are themselves waiting for it, so the job would hang and the traceback never
show. Instead the failing rank prints its traceback and exits non-zero at once; torchrun (or
srun) then ends the other ranks. An error the user can fix (`tool_errors.UserFacingError`) is
one line for the whole job, `<tool>: error: <message>`, exit 2, printed by the first rank to
claim it in the launcher's key-value store; Ctrl-C is `<tool>: interrupted`, exit 130. No
orphans: processes die with their launcher and with the process that forked them
(`exit_with_parent`). Details: docs/reliability.md and docs/integrity.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import logging
import os
import signal
import sys
import traceback
from typing import Iterator, Optional

from sara_megatron.distributed import launcher_world_size, read_launcher_env
from sara_megatron.tool_errors import (
    INTERRUPTED_STATUS,
    USER_ERROR_STATUS,
    interrupted_message,
    user_error_message,
)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 outside torchrun / srun).

    Known before the process group exists.

    Returns:
        The rank.
    """
    return read_launcher_env().rank


def configure_logging(rank: int) -> None:
    """The library's INFO messages (resume, saves, the layout) on rank 0, warnings elsewhere.

    Every rank repeating them would bury the progress lines.

    Args:
        rank: This process's global rank.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sara_megatron").setLevel(logging.INFO if rank == 0 else logging.WARNING)


_REPORT_KEY = "sara_megatron/reported"


def _launcher_store():
    """A client of the key-value store torchrun's agent serves to its workers, else the default
    process group's store (srun, once the group exists), else None."""
    import torch.distributed as dist

    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in env:
        return dist.TCPStore(env.get("MASTER_ADDR", "127.0.0.1"), int(env["MASTER_PORT"]),
                             is_master=False, timeout=datetime.timedelta(seconds=10))
    if dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    return None


def _report_key() -> str:
    env = os.environ
    return (f"{_REPORT_KEY}/{env.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def first_to_report(status: int) -> bool:
    """Whether this process is the first of its job to report how the job ends.

    A user error or an interrupt: `status` is recorded for the other ranks (`reported_status`).
    True for one rank of a torchrun job, without waiting for any other rank; True on every rank
    that asks where no store can be reached.

    Args:
        status: The exit status this rank ends with.
    """
    if launcher_world_size() <= 1:
        return True
    try:
        store = _launcher_store()
        if store is None:
            return True
        if store.add(_report_key(), 1) != 1:
            return False
        store.set(_report_key() + "/status", str(status))
        return True
    except Exception:  # noqa: BLE001 - the store is gone (its host exited): say it here
        return True


def reported_status() -> Optional[int]:
    """The status another rank of the job reported its end with (`first_to_report`), else None.
    A rank whose collective broke because that rank exited ends with it, without a word."""
    if launcher_world_size() <= 1:
        return None
    try:
        store = _launcher_store()
        key = _report_key() + "/status"
        if store is None or not store.check([key]):
            return None
        return int(store.get(key))
    except Exception:  # noqa: BLE001 - no store, no report: the error is this rank's own
        return None


def _report_once(line: str, status: int, debug: bool) -> None:
    if first_to_report(status):
        if debug:
            traceback.print_exc()
        print(line, file=sys.stderr)
    _exit_now(status)


class ToolArgumentParser(argparse.ArgumentParser):
    """The argument parser of a tool every rank runs: a flag error (argparse's own, or
    `error(...)` called after parsing, before `exit_at_once_on_error` is entered) prints the
    usage and `<prog>: error: <message>` once for the job, from the first rank to claim the
    report (`first_to_report`; a rank-0-only rule could lose the line when torchrun ends rank 0
    on another rank's exit), and every rank exits 2."""

    def error(self, message: str):
        """Print the usage and `<prog>: error: <message>` once for the job; every rank exits 2.

        Args:
            message: The error message.
        """
        if first_to_report(USER_ERROR_STATUS):
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)


@contextlib.contextmanager
def exit_at_once_on_error(rank: int, tool: Optional[str] = None,
                          output: Optional[str] = None, debug: bool = False,
                          resumable: bool = False) -> Iterator[None]:
    """Around a rank's work: on an exception, report it and end the process at once.

    The process ends with status 1 (or the SystemExit's status), running no clean-up that could
    wait for other ranks. An error the user can fix prints as `<tool>: error: <message>` and
    exits 2 (`debug`: after its traceback); Ctrl-C prints `<tool>: interrupted` (`resumable`: and
    that the same command resumes) and exits 130. Either is printed by one rank of the job
    (`first_to_report`); the others exit with the same status without a word, also when what they
    meet is a broken collective (the reporting rank left it).

    Args:
        rank: This process's global rank (named in a traceback's heading).
        tool: The tool's name in the one-line messages; default the script's file name.
        output: The output path a user error may name (`tool_errors.user_error_message`).
        debug: Print the traceback before a user error's line.
        resumable: Say on Ctrl-C that the same command resumes.

    Yields:
        Nothing; the body runs inside.
    """
    tool = tool or os.path.basename(sys.argv[0])
    try:
        yield
    except BaseException as err:  # KeyboardInterrupt too: the barrier would hang it the same
        if isinstance(err, SystemExit) and err.code in (None, 0):
            raise
        if isinstance(err, KeyboardInterrupt):
            _report_once(interrupted_message(tool, resumable), INTERRUPTED_STATUS, debug)
        message = user_error_message(err, output)
        if message is not None:
            _report_once(f"{tool}: error: {message}", USER_ERROR_STATUS, debug)
        status = reported_status()  # a peer's collective broke because a reporting rank left
        if status is not None:
            _exit_now(status)
        print(f"rank {rank} failed; exiting without waiting for the other ranks:",
              file=sys.stderr)
        traceback.print_exc()
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
        _exit_now(code)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not available: the launcher's own clean-up is all there is
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


# Run by a spawned child's interpreter before it becomes the child: arm the parent-death signal,
# stop if the parent is already gone, then exec the command multiprocessing meant to run.
_ARM_THEN_EXEC = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
                  "os.getppid() == int(sys.argv[1]) or os._exit(1); "
                  "os.execv(sys.argv[2], sys.argv[2:])")


def _spawn_dying_with_parent(spawnv_passfds):
    """multiprocessing's spawn / forkserver start (megatron's checkpoint writer uses a spawned
    Manager; the resource tracker too) is fork + exec, which runs no fork hook: the child is
    started through a one-line interpreter that arms the signal and execs it."""

    def spawn(path, args, passfds):
        python = os.fsencode(sys.executable)  # as multiprocessing passes its paths: bytes
        wrapped = [python, b"-S", b"-I", b"-c", _ARM_THEN_EXEC.encode(),
                   str(os.getpid()).encode(), path, *args[1:]]
        return spawnv_passfds(python, [os.fsencode(a) for a in wrapped], passfds)

    return spawn


def exit_with_parent() -> None:
    """Linux: every process this one starts from now on (megatron's checkpoint writer helpers,
    data-loader workers, multiprocessing's spawned helpers) is killed when this process dies,
    and so is this process when its launcher (torchrun, srun) dies; a tool started from a shell
    keeps running without it (nohup). Elsewhere nothing changes."""
    if not sys.platform.startswith("linux") or getattr(exit_with_parent, "armed", False):
        return
    import multiprocessing.util

    exit_with_parent.armed = True
    launched = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID"))
    if launched:
        _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)
    multiprocessing.util.spawnv_passfds = _spawn_dying_with_parent(
        multiprocessing.util.spawnv_passfds)


def _exit_now(code: int) -> None:
    # os._exit skips interpreter teardown: no atexit handlers and no process-group destructors,
    # which may wait for work a peer never answers. Buffered output is flushed by hand first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
