"""Per-step metrics: a progress line on stdout, TensorBoard scalars, wandb (when asked), JSON lines.

A resumed run replays the steps after its checkpoint, so what an earlier process logged past that
step is dropped from the JSON log (rewritten atomically) and hidden in TensorBoard (`purge_step`):
each step then appears once, with the values of the run that carried on.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from typing import Optional
from urllib.parse import urlparse

from sara_megatron.io import atomic_open


class MetricsWriter:
    """Writes on the calling rank only; the trainer calls it on global rank 0.

    Args:
        total_steps: The run's length in steps (for the progress line's ETA).
        tensorboard_dir: TensorBoard's log folder, or None.
        wandb_project: The Weights & Biases project, or None.
        json_log: The JSON-lines file (one record per step), or None.
        run_config: The run's settings, given to wandb as its config.
        start_step: The step this process starts at (a resumed run's checkpoint iteration, 0 for
            a fresh run): steps after it that earlier processes logged are replaced. None: the
            logs are only appended to, and the rate is measured from the first step written.

    Raises:
        RuntimeError: A setting that cannot be used (`check_metrics_setup`).
    """

    def __init__(
        self,
        total_steps: int,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        json_log: Optional[str] = None,
        run_config: Optional[dict] = None,
        start_step: Optional[int] = None,
    ):
        check_metrics_setup(tensorboard_dir, wandb_project, json_log)
        self.total_steps = total_steps
        self.started = time.time()
        # (time, step) the ETA's rate is measured from: only steps this process ran count.
        self._since = (self.started, start_step) if start_step is not None else None
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # Events an earlier process wrote from start_step + 1 on are hidden from readers.
            purge_step = start_step + 1 if start_step is not None else None
            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=purge_step)
        self.wandb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=run_config or {})
        if json_log and start_step is not None:
            _drop_logged_steps_after(json_log, start_step)
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
        """Print the progress line and log one step's values to every sink that is set.

        Args:
            step: The global step.
            scalars: name -> value (ce, lb, js, lr, grad_norm, tokens_per_s, ...); a non-finite
                value is null in the JSON log.
            js_per_layer: layer -> that layer's routing JS, logged as `js_layer/<layer>`.
        """
        eta = self._seconds_per_step(step, scalars) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("ce", "lb", "js", "aes_variance", "aes_orthogonality", "lr", "grad_norm",
                    "tokens_per_s", "tflops_per_gpu"):
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
            # Strict JSON: a non-finite value (a NaN grad norm without clipping) is null.
            record = {key: value if not isinstance(value, float) or math.isfinite(value) else None
                      for key, value in dict(step=step, **flat).items()}
            self.json_log.write(json.dumps(record, allow_nan=False) + "\n")
            self.json_log.flush()

    def close(self) -> None:
        """Close TensorBoard, finish the wandb run and close the JSON log."""
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
    writing.

    Args:
        tensorboard_dir: `logging.tensorboard_dir`.
        wandb_project: `logging.wandb_project`.
        json_log: `logging.json_log`.

    Raises:
        RuntimeError: A needed package is missing, wandb has no key, or the JSON log's path is
            not a writable file.
    """
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
        if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
                or _wandb_login_saved()):
            # Without a key wandb.init would wait for one at a prompt no batch job answers.
            raise RuntimeError("wandb needs WANDB_API_KEY (or WANDB_MODE=offline) in the env, "
                               "or a key saved by `wandb login`")
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


def _wandb_login_saved() -> bool:
    """Whether `wandb login` saved a key: it keeps it in the netrc file (NETRC, else ~/.netrc)
    under the host of WANDB_BASE_URL. Only the entry's presence is read, never its key."""
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _drop_logged_steps_after(json_log: str, step: int) -> None:
    """Rewrite the JSON log without the records of steps after `step`, which the resumed run
    replays. Lines that are not step records (a torn last line after a kill) go too."""
    if not os.path.exists(json_log):
        return
    with open(json_log, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        print(f"{json_log}: dropped {len(lines) - len(kept)} lines logged after step {step}, "
              "which this run replays", flush=True)
        with atomic_open(json_log) as handle:
            handle.writelines(line + "\n" for line in kept)
