"""Which layers SARA aligns: an explicit range, all layers, or a seeded random subset.

The paper's ablations: `-s` (the chosen middle range: Qwen3-30B-A3B 7..34, Phi-3.5-MoE 13..26,
inclusive, 0-based like HF's `model.layers.i`), `-a` (all layers), `-r` (random layers, as many as
the range holds). A fourth way: the name of a divergence JSON file (tools/routing_divergence.py
--json) whose `suggested_range` gives `first_layer` and `last_layer`, the range read off the
model's own U-curve.
"""

from __future__ import annotations

import json
import os
import random

DEFAULT_RANGES = {"qwen3_moe": (7, 34), "phimoe": (13, 26)}
MODES = ("range", "all", "random")


def is_layer_range_file(mode: str) -> bool:
    """Whether `mode` names an existing file rather than one of `MODES`.

    Args:
        mode: the `sara.layers` setting.
    """
    return mode not in MODES and isinstance(mode, str) and os.path.isfile(mode)


def read_layer_range_file(path: str) -> tuple[int, int]:
    """The `suggested_range` a divergence JSON file holds.

    Args:
        path: a file `tools/routing_divergence.py --json` wrote.

    Returns:
        (first, last), inclusive global 0-based layer indices.

    Raises:
        ValueError: the file cannot be read, has no suggested range, or its range is not
            0 <= first <= last.
    """
    try:
        with open(path, encoding="utf-8") as f:
            suggested = json.load(f)["suggested_range"]
        first, last = suggested["first_layer"], suggested["last_layer"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"sara.layers {path}: not a divergence JSON file with a suggested_range "
                         f"(first_layer, last_layer): {err!r}") from None
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last):
        raise ValueError(f"sara.layers {path}: suggested_range {first}..{last} is not a forward "
                         "range of layer indices")
    return first, last


def check_layer_setting(mode: str, first: int | None, last: int | None) -> None:
    """What the config accepts as sara.layers: a mode, or a range file without first/last.

    Args:
        mode: the `sara.layers` setting.
        first, last: `sara.first_layer` / `sara.last_layer` (None: unset).

    Raises:
        ValueError: neither a mode nor a readable range file, or a range file with first or
            last set.
    """
    if mode in MODES:
        return
    if not is_layer_range_file(mode):
        raise ValueError(f"sara.layers must be one of {', '.join(MODES)}, got {mode!r} (or the "
                         "name of an existing divergence JSON file with a suggested_range)")
    read_layer_range_file(mode)
    if first is not None or last is not None:
        raise ValueError(f"sara.layers names the range file {mode}; leave sara.first_layer and "
                         "sara.last_layer unset (or use sara.layers: range with them)")


def select_alignment_layers(
    num_layers: int,
    mode: str = "range",
    *,
    family: str | None = None,
    first: int | None = None,
    last: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The layers SARA aligns.

    Args:
        num_layers: the model's layer count.
        mode: "range": `first..last` inclusive, defaulting to the family's paper range; "all":
            every layer; "random": a seeded subset of the size the range would have; or a
            divergence JSON file: the range its `suggested_range` names.
        family: the model family (`DEFAULT_RANGES` key), for the default range.
        first, last: the range's ends, inclusive; None: the family's default.
        seed: the random subset's seed.

    Returns:
        Sorted global 0-based layer indices.

    Raises:
        ValueError: an unknown mode, no default range for the family, or a range that does not
            fit `num_layers`.
    """
    if is_layer_range_file(mode):
        check_layer_setting(mode, first, last)
        mode, (first, last) = "range", read_layer_range_file(mode)
    if mode not in MODES:
        raise ValueError(f"layer selection mode must be one of {MODES}, got {mode!r}")
    if mode == "all":
        return list(range(num_layers))
    if first is None or last is None:
        if family not in DEFAULT_RANGES:
            raise ValueError(
                f"no default alignment range for family {family!r}; pass first and last "
                f"(defaults exist for {', '.join(DEFAULT_RANGES)})"
            )
        d_first, d_last = DEFAULT_RANGES[family]
        first = d_first if first is None else first
        last = d_last if last is None else last
    if not 0 <= first <= last < num_layers:
        raise ValueError(
            f"alignment range {first}..{last} does not fit a model of {num_layers} layers"
        )
    chosen = list(range(first, last + 1))
    if mode == "random":
        chosen = sorted(random.Random(seed).sample(range(num_layers), len(chosen)))
    return chosen
