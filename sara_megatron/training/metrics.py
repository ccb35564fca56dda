"""Per-step metrics: a progress line on stdout, TensorBoard scalars, wandb (when asked), JSON lines."""

from __future__ import annotations

import json
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
    ):
        self.total_steps = total_steps
        self.started = time.time()
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(tensorboard_dir)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed") from err
            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                raise RuntimeError("wandb needs WANDB_API_KEY (or WANDB_MODE=offline) in the env")
            self.wandb = wandb.init(project=wandb_project, config=run_config or {})
        self.json_log = open(json_log, "a", encoding="utf-8") if json_log else None

    def write(self, step: int, scalars: dict[str, float], js_per_layer: dict[int, float]) -> None:
        elapsed = time.time() - self.started
        done = max(step, 1)
        eta = elapsed / done * (self.total_steps - step) if step else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("ce", "lb", "js", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
            if key in scalars:
                parts.append(f"{key} {scalars[key]:.4g}")
        if js_per_layer:
            parts.append("js_layers " + ",".join(f"{layer}:{value:.3g}"
                                                 for layer, value in sorted(js_per_layer.items())))
        parts.append(f"eta {eta:.0f}s")
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
