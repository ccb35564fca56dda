"""What a training entry point (tools/train.py) does around `train()`: logging, checks that would
otherwise fail on rank 0 alone mid-start-up, and failing fast.

A rank that raises must not go on to a clean shutdown: `destroy_distributed()` waits in a barrier
for ranks that are themselves waiting for it (in a collective it will never join), so the job
hangs and the traceback, printed only after the `finally`, never shows. Instead the failing rank
prints its traceback and exits non-zero at once; torchrun (or srun) then ends the other ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator

from sara_megatron.distributed import read_launcher_env
from sara_megatron.training.config import TrainConfig
from sara_megatron.training.metrics import check_metrics_setup


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 outside torchrun / srun); known
    before the process group exists."""
    return read_launcher_env().rank


def configure_logging(rank: int) -> None:
    """The library's INFO messages (resume, saves, the layout) on rank 0, warnings elsewhere:
    every rank repeating them would bury the progress lines."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sara_megatron").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def check_before_start(cfg: TrainConfig, rank: int) -> None:
    """Settings only rank 0 uses (the metrics writer's), checked before the model is built. On
    rank 0 only: its json_log folder need not exist on other nodes."""
    if rank == 0:
        lg = cfg.logging
        check_metrics_setup(lg.tensorboard_dir, lg.wandb_project, lg.json_log)


@contextlib.contextmanager
def exit_at_once_on_error(rank: int) -> Iterator[None]:
    """Around a rank's work: on an exception, print it and end the process with status 1 (or
    the SystemExit's status), running no clean-up that could wait for other ranks."""
    try:
        yield
    except BaseException as err:  # KeyboardInterrupt too: the barrier would hang it the same
        if isinstance(err, SystemExit) and err.code in (None, 0):
            raise
        print(f"rank {rank} failed; exiting without waiting for the other ranks:",
              file=sys.stderr)
        traceback.print_exc()
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
        _exit_now(code)


def _exit_now(code: int) -> None:
    # os._exit skips interpreter teardown: no atexit handlers and no process-group destructors,
    # which may wait for work a peer never answers. Buffered output is flushed by hand first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
