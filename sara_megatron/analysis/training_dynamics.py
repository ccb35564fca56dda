"""Training dynamics (the paper's Figure 3): CE, LB and JS (total and per aligned layer) against
step from the runs' JSON logs (`logging.json_log`: one JSON object per step with step, ce, lb, js,
js_layer/<layer>, ...), several runs overlaid; and accuracy against checkpoint step."""

from __future__ import annotations

import math
import os
from typing import Optional

from sara_megatron.analysis.plotting import new_figure, save_png
from sara_megatron.io import read_jsonl_objects
from sara_megatron.tool_errors import InputError

DYNAMICS_WIDTH, DYNAMICS_HEIGHT = 1400, 420
ACCURACY_PANEL_WIDTH, ACCURACY_HEIGHT = 480, 400
LAYER_PREFIX = "js_layer/"


def read_json_log(path: str | os.PathLike) -> list[dict]:
    """The records of a training JSON log, in step order (null values read as nan). A last line
    without its newline is left out: the run may still be writing it, or a kill cut it short.

    Args:
        path: The log (`logging.json_log`).

    Raises:
        InputError: A record has no integer step, or the log holds none.
    """
    records = []
    for number, record in read_jsonl_objects(path, complete_lines_only=True):
        try:
            int(record["step"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{number}: not a training log record: {err!r}") from None
        records.append({k: (math.nan if v is None else v) for k, v in record.items()})
    if not records:
        raise InputError(f"{path}: no logged step")
    return sorted(records, key=lambda r: r["step"])


def logged_layers(records: list[dict]) -> list[int]:
    """The layers with a per-layer JS value (`js_layer/<layer>`) in any record, ascending.

    Args:
        records: A training log's records.
    """
    return sorted({int(k[len(LAYER_PREFIX):]) for r in records for k in r
                   if k.startswith(LAYER_PREFIX)})


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of one logged quantity, over the records that hold it.

    Args:
        records: A training log's records.
        key: The quantity, e.g. "ce" or "js_layer/12".
    """
    steps = [r["step"] for r in records if key in r]
    return steps, [float(r[key]) for r in records if key in r]


def plot_training_dynamics(runs: dict[str, list[dict]], path: str | os.PathLike) -> str:
    """Panels CE, LB, JS (mean over aligned layers) and JS per aligned layer; one colour per run
    (per-layer lines in that run's colour, thin).

    Args:
        runs: {run name: its log's records}.
        path: Where the PNG is written.

    Returns:
        The PNG's path.
    """
    fig, axes = new_figure(DYNAMICS_WIDTH, DYNAMICS_HEIGHT, 1, 4)
    colors = [f"C{i}" for i in range(10)]
    for (name, records), color in zip(runs.items(), colors * 10):
        for ax, key in zip(axes[0][:3], ("ce", "lb", "js")):
            ax.plot(*series(records, key), color=color, label=name, linewidth=1.5)
        for i, layer in enumerate(logged_layers(records)):
            ax = axes[0][3]
            ax.plot(*series(records, f"{LAYER_PREFIX}{layer}"), color=color, linewidth=0.7,
                    alpha=0.6, label=name if i == 0 else None)
    titles = ("cross-entropy", "load balancing", "JS (mean over aligned layers)",
              "JS per aligned layer")
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_accuracy_by_checkpoint(points: dict[str, dict[str, list[tuple[int, float]]]],
                                path: str | os.PathLike, ylabel: Optional[str] = None) -> str:
    """One panel per benchmark: accuracy (%) against checkpoint step, one line per run.

    Args:
        points: {benchmark: {run: [(step, accuracy), ...]}}.
        path: Where the PNG is written.
        ylabel: The y-axis label; None: "accuracy (%), mean over languages".

    Returns:
        The PNG's path.
    """
    benchmarks = list(points)
    fig, axes = new_figure(ACCURACY_PANEL_WIDTH * len(benchmarks), ACCURACY_HEIGHT, 1,
                           len(benchmarks))
    for ax, benchmark in zip(axes[0], benchmarks):
        for name, values in points[benchmark].items():
            values = sorted(values)
            ax.plot([s for s, _ in values], [a for _, a in values], marker="o", label=name)
        ax.set_title(benchmark, fontsize=10)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel(ylabel or "accuracy (%), mean over languages")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
