"""Run the project's tools in subprocesses (`sara_megatron.tool_runner`), as a user would,
timing each step."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from sara_megatron import tool_runner
from sara_megatron.tool_runner import single_rank_environment, tool_environment

# The folder holding the package: the checkout, or site-packages of an installed copy. Source
# paths (e.g. for the base model's cache key) are named relative to it.
REPO = Path(__file__).resolve().parents[2]


class StepFailed(RuntimeError):
    """A tool the experiment ran exited non-zero (the message names its log)."""


class StepTimer:
    """Wall and CPU time of each named stage, in the order they ran. CPU time (user + system of
    the tool's process) does not grow when other programs share the cores; wall time does."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        """Add time to a stage (summed when the stage runs more than once).

        Args:
            stage: The stage's name.
            seconds: Wall time, in seconds.
            cpu_seconds: CPU time, in seconds, if measured.
        """
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if cpu_seconds is not None:
            self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu_seconds


def run_tool(step: str, tool: str, args: list[str], work: Path, timer: StepTimer | None = None,
             quiet: bool = False) -> float:
    """Run a tool in one process in `work` (`tool_runner.run_tool`), output to
    <work>/logs/<step>.log.

    Args:
        step: the stage's name (its log's and timer's).
        tool: the tool's name, e.g. "train" (or its checkout file's, "train.py").
        args: its arguments.
        work: the folder it runs in.
        timer: records the stage's wall and CPU time.
        quiet: print no line when it is done.

    Returns:
        Its wall time in seconds.

    Raises:
        StepFailed: it exited non-zero (the message holds the tail of its log).
    """
    # One process is a world of one: no torchrun needed. Nothing here talks to a server.
    env = tool_environment(single_rank_environment(), unset=("OPENAI_API_KEY",))
    run = tool_runner.run_tool(tool.removesuffix(".py"), args, work, work / "logs" / f"{step}.log", env=env)
    if run.returncode != 0:
        raise StepFailed(f"{step} failed (exit {run.returncode}); log {run.log}:\n"
                         f"{run.tail(3000)}")
    if timer is not None:
        timer.add(step, run.seconds, run.cpu_seconds)
    if not quiet:
        print(f"[experiment] {step} done in {run.seconds:.0f}s", flush=True)
    return run.seconds


def run_parallel(jobs: list, workers: int) -> list:
    """Call each zero-argument job, `workers` at a time (each runs its own subprocesses).

    Args:
        jobs: Zero-argument callables.
        workers: How many run at once in threads; 1 or less calls them in order here.

    Returns:
        Each job's return value, in the order of `jobs`.
    """
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def write_train_config(path: Path, config: dict) -> Path:
    """Write a training config as YAML (parent folders created).

    Args:
        path: The YAML file to write.
        config: The config, as `tools/train.py` reads it.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def latest_checkpoint(save_dir: Path) -> Path:
    """The newest complete checkpoint of a run (`training.checkpoint.latest_checkpoint`).

    Args:
        save_dir: The run's checkpoint folder (`checkpoint.save_dir`).
    """
    from sara_megatron.training.checkpoint import latest_checkpoint as latest

    return Path(latest(save_dir))
