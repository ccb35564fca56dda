"""`torchrun` for the project's tools: the same launcher and arguments, reporting the way the
tools do. `python -m sara_megatron.torchrun --nproc-per-node 8 tools/train.py --config ...`, or
with the tool's module: `... --nproc-per-node 8 -m sara_megatron.cli.train --config ...`.

torchrun reports any worker that exits non-zero with a traceback of its own and a failure
summary, and exits 1, so a user error the tool already put in one line (`<tool>: error: ...`,
exit 2, printed by one rank: `launch.exit_at_once_on_error`) would drown in it, and Ctrl-C prints
torchrun's own traceback. Here, when the first worker to fail exited 2 (a user error) or 130
(interrupted), or when the launcher itself is interrupted, the job exits with that status and
adds nothing to the workers' line; any other failure is reported as torchrun reports it.
"""

from __future__ import annotations

import logging
import signal
import sys

from sara_megatron.tool_errors import INTERRUPTED_STATUS, USER_ERROR_STATUS

_QUIET_STATUSES = (USER_ERROR_STATUS, INTERRUPTED_STATUS)
# torchrun's own log lines about a failed or interrupted worker and the shutdown of the others.
_AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                  "torch.distributed.elastic.agent.server.api")


class _QuietAfterReportedEnd(logging.Filter):
    """Drops torchrun's lines about a worker that ended with a status the worker reported
    itself, and about the shutdown of the others. torchrun signals the others before it logs
    which worker failed: those lines are held until it does, and released for any other end."""

    def __init__(self):
        super().__init__()
        self.quiet = False
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "released", False):
            return True
        message = str(record.msg)
        if message.startswith("failed (exitcode: %s)"):
            self.quiet = bool(record.args) and record.args[0] in _QUIET_STATUSES
            if not self.quiet:
                self.release()
            return not self.quiet
        if message.startswith("Received %s death signal"):
            self.quiet = bool(record.args) and record.args[0] == signal.SIGINT
            return not self.quiet
        if "closing signal" in message:
            if not self.quiet:
                self.held.append(record)
            return False
        return True

    def release(self) -> None:
        """Log the held lines (the job did not end with a status a worker reported)."""
        held, self.held = self.held, []
        for record in held:
            record.released = True
            logging.getLogger(record.name).handle(record)


def main(argv=None) -> int:
    """Run torchrun with `argv` (default: the command line).

    Args:
        argv: torchrun's arguments (the tool and its own arguments after them); None reads
            `sys.argv`.

    Returns:
        The job's exit status: 0, or 2 / 130 when the first worker to fail reported a user error /
        an interrupt (or the launcher was interrupted). Any other failure is raised as torchrun
        raises it.
    """
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet = _QuietAfterReportedEnd()
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        torch_run.run(torch_run.parse_args(argv))
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in _QUIET_STATUSES:
            return first.exitcode
        quiet.release()
        raise
    except SignalException as err:
        if err.sigval == signal.SIGINT:
            return INTERRUPTED_STATUS
        quiet.release()
        raise
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    quiet.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
