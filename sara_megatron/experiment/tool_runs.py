"""Run the project's user-facing tools in subprocesses, as a user would, timing each step."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


class StepFailed(RuntimeError):
    """A tool the experiment ran exited non-zero (the message names its log)."""


class StepTimer:
    """Wall and CPU time of each named stage, in the order they ran. CPU time (user + system of
    the tool's process) does not grow when other programs share the cores; wall time does."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if cpu_seconds is not None:
            self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu_seconds


def run_tool(step: str, tool: str, args: list[str], work: Path, timer: StepTimer | None = None,
             quiet: bool = False) -> float:
    """`python tools/<tool> args...` in `work`; output to <work>/logs/<step>.log. Returns seconds."""
    log = work / "logs" / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS="ignore")
    env.pop("OPENAI_API_KEY", None)  # nothing here talks to a server
    # One process is a world of one: no torchrun needed.
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(TOOLS / tool), *args], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise StepFailed(f"{step} failed (exit {proc.returncode}); log {log}:\n{tail}")
    if timer is not None:
        timer.add(step, seconds, usage.ru_utime + usage.ru_stime)
    if not quiet:
        print(f"[experiment] {step} done in {seconds:.0f}s", flush=True)
    return seconds


def _free_port() -> int:
    from sara_megatron.distributed import free_port

    return free_port()


def run_parallel(jobs: list, workers: int) -> list:
    """Call each zero-argument job, `workers` at a time (each runs its own subprocesses)."""
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def write_train_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def latest_checkpoint(save_dir: Path) -> Path:
    from sara_megatron.training.checkpoint import iteration_dir, latest_iteration

    return Path(iteration_dir(os.fspath(save_dir), latest_iteration(os.fspath(save_dir))))
