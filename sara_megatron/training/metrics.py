"""Per-step metrics: a progress line on stdout, TensorBoard scalars, wandb (when asked), JSON lines."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional


class MetricsWriter:
    """Writes on the calling rank only; the trainer calls it on global rank 0."""

    def __init__(
        self,
        total_steps: int,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        json_log: Optional[str] = None,
        run_config: Optional[dict] = None,
        start_step: Optional[int] = None,
    ):
        """start_step: the step this process starts at (a resumed run's checkpoint iteration);
        None: the rate is measured from the first step written on (see `_seconds_per_step`)."""
        check_metrics_setup(tensorboard_dir, wandb_project, json_log)
        self.total_steps = total_steps
        self.started = time.time()
        # (time, step) the ETA's rate is measured from: only steps this process ran count.
        self._since = (self.started, start_step) if start_step is not None else None
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir)
        self.wandb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=run_config or {})
        self.json_log = open(json_log, "a", encoding="utf-8") if json_log else None

    def _seconds_per_step(self, step: int, scalars: dict[str, float]) -> float:
        """From the steps this process ran, not the global step: after a resume at step 900,
        step 901 took the whole time since start-up. Without a start step, the first write is
        the mark, and until a later one its own step time (when given) stands in."""
        now = time.time()
        if self._since is None:
            self._since = (now, step)
        since_time, since_step = self._since
        if step > since_step:
            return (now - since_time) / (step - since_step)
        return scalars.get("step_time_s", float("nan"))

    def write(self, step: int, scalars: dict[str, float], js_per_layer: dict[int, float]) -> None:
        eta = self._seconds_per_step(step, scalars) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("ce", "lb", "js", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
            if key in scalars:
                parts.append(f"{key} {scalars[key]:.4g}")
        if js_per_layer:
            parts.append("js_layers " + ",".join(f"{layer}:{value:.3g}"
                                                 for layer, value in sorted(js_per_layer.items())))
        parts.append(f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?")
        print(" | ".join(parts), flush=True)
        flat = dict(scalars)
        flat.update({f"js_layer/{layer}": v for layer, v in js_per_layer.items()})
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        if self.json_log is not None:
            self.json_log.write(json.dumps(dict(step=step, **flat)) + "\n")
            self.json_log.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.json_log is not None:
            self.json_log.close()


def check_metrics_setup(
    tensorboard_dir: Optional[str] = None,
    wandb_project: Optional[str] = None,
    json_log: Optional[str] = None,
) -> None:
    """Raise what MetricsWriter would raise on these settings, without opening anything: a run
    calls it before building its model, rather than failing (on rank 0 alone) when it starts
    writing."""
    if tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise RuntimeError("logging.tensorboard_dir is set but the tensorboard package is "
                               "not installed") from err
    if wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise RuntimeError("logging.wandb_project is set but wandb is not installed") from err
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            raise RuntimeError("wandb needs WANDB_API_KEY (or WANDB_MODE=offline) in the env")
    if json_log:
        _check_writable_file(json_log, "logging.json_log")


def _check_writable_file(path: str, key: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RuntimeError(f"{key} {path} is a folder, not a file")
    if not os.path.isdir(folder):
        raise RuntimeError(f"{key} {path}: its folder {folder} does not exist")
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        raise RuntimeError(f"{key} {path}: {target} is not writable")
