"""Which layers SARA aligns: an explicit range, all layers, or a seeded random subset.

The paper's ablations: `-s` (the chosen middle range: Qwen3-30B-A3B 7..34, Phi-3.5-MoE 13..26,
inclusive, 0-based like HF's `model.layers.i`), `-a` (all layers), `-r` (random layers, as many as
the range holds).
"""

from __future__ import annotations

import random

DEFAULT_RANGES = {"qwen3_moe": (7, 34), "phimoe": (13, 26)}
MODES = ("range", "all", "random")


def select_alignment_layers(
    num_layers: int,
    mode: str = "range",
    *,
    family: str | None = None,
    first: int | None = None,
    last: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Sorted global 0-based layer indices.

    range: `first..last` inclusive, defaulting to the family's paper range.
    all: every layer.  random: a seeded subset of the size the range would have.
    """
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
