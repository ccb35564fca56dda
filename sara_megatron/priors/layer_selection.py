"""Layer selections as users write them: "7-34" (inclusive, as the paper's "7 to 34"),
"0,3,8-11", "all". Indices are global and 0-based (HF `model.layers.i`)."""

from __future__ import annotations

from typing import Optional


def format_layer_ranges(layers) -> str:
    """Sorted layer indices as inclusive runs: [7, 8, 9, 12] -> "7..9, 12".

    Args:
        layers: layer indices, any order.

    Returns:
        The runs, comma-separated ("" for no layers).
    """
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{lo}..{hi}" if hi > lo else str(lo) for lo, hi in runs)


def parse_layer_selection(text: Optional[str], num_layers: int) -> tuple[int, ...]:
    """The layers a user's selection names.

    Args:
        text: "all", "A-B" (inclusive) or a comma list of both; None, "" or "all" select every
            layer.
        num_layers: the model's layer count.

    Returns:
        Sorted unique global 0-based layer indices.

    Raises:
        ValueError: text that does not parse, or layers outside 0..num_layers-1.
    """
    if text is None or text.strip() in ("", "all"):
        return tuple(range(num_layers))
    layers = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(
                f"bad layer selection {text!r}: use 'all', 'A-B' (inclusive) or a comma list"
            ) from None
    outside = sorted(i for i in layers if not 0 <= i < num_layers)
    if outside:
        raise ValueError(f"layers {format_layer_ranges(outside)} are outside the model's "
                         f"0..{num_layers - 1} ({num_layers} layers)")
    return tuple(sorted(layers))
