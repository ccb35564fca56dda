"""The automatic alignment range: which contiguous layers a divergence curve suggests aligning.

The rule (the paper picks the valley of its U-shaped layer-wise divergence by eye; this makes the
choice reproducible for any model):

1. The curve is the mean over target languages of the per-layer divergence, over a contiguous
   run of measured layers.
2. It is smoothed by a centred moving average of odd width `window` (1 = no smoothing); at the
   ends the window is cut to the layers that exist (layer 0 with window 3 averages layers 0, 1).
3. threshold = min + alpha · (max − min) of the smoothed curve, alpha in [0, 1].
4. The suggested range is the longest contiguous run of layers whose smoothed value is <= the
   threshold (the minimum always qualifies, so there is one; a flat curve gives every layer).
   Runs of equal length: the one with the lower mean smoothed divergence; equal means too: the
   lower layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

DEFAULT_ALPHA = 0.5
DEFAULT_WINDOW = 3


@dataclasses.dataclass(frozen=True)
class AlignmentRange:
    """A suggested alignment range and how it was found.

    Attributes:
        first_layer, last_layer: The range's first and last layer, inclusive.
        threshold: The smoothed divergence at or below which a layer qualifies.
        alpha: The threshold's fraction of the smoothed curve's span, in [0, 1].
        window: The odd width of the moving average, in layers.
        layers: The measured layers the curve covers.
        smoothed: The smoothed mean curve, one value per measured layer.
    """

    first_layer: int
    last_layer: int
    threshold: float
    alpha: float
    window: int
    layers: tuple[int, ...]  # the measured layers the curve covers
    smoothed: tuple[float, ...]  # the smoothed mean curve, one value per measured layer

    @property
    def layer_list(self) -> list[int]:
        """The layers of the range, first to last."""
        return list(range(self.first_layer, self.last_layer + 1))

    def to_json(self, curve: str = "js") -> dict:
        """The range as a JSON-ready dict, with the rule that chose it.

        Args:
            curve: The name of the divergence curve the range was found on (e.g. "js").
        """
        return {"first_layer": self.first_layer, "last_layer": self.last_layer,
                "threshold": self.threshold, "alpha": self.alpha, "window": self.window,
                "curve": curve, "smoothed_mean": list(self.smoothed),
                "rule": "longest run of layers whose centred moving average (width window) of "
                        "the mean divergence over languages is <= min + alpha*(max - min); ties: "
                        "lower mean, then lower layers"}


def check_range_parameters(alpha: float, window: int) -> None:
    """Check the range rule's parameters.

    Args:
        alpha: The threshold's fraction of the curve's span.
        window: The moving average's width in layers.

    Raises:
        ValueError: `alpha` is not in [0, 1], or `window` is not an odd int >= 1.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1
            and window % 2 == 1):
        raise ValueError(f"the smoothing window must be an odd number of layers >= 1, "
                         f"got {window!r}")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average of odd width; the window is cut at the ends.

    Args:
        values: The curve, one value per layer.
        window: The odd width of the average.

    Returns:
        The smoothed curve, as long as `values`.
    """
    half = window // 2
    n = len(values)
    out = []
    for i in range(n):
        part = values[max(0, i - half): min(n, i + half + 1)]
        out.append(sum(part) / len(part))
    return out


def mean_curve(divergence: Mapping[str, Sequence[float]]) -> list[float]:
    """Per layer, the mean over languages.

    Args:
        divergence: {language: per-layer values}, all of one length.

    Returns:
        The mean curve, one value per layer.

    Raises:
        ValueError: `divergence` is empty or its curves differ in length.
    """
    if not divergence:
        raise ValueError("no language in the divergence result")
    curves = list(divergence.values())
    n = len(curves[0])
    if any(len(c) != n for c in curves):
        raise ValueError("the languages' curves have different lengths")
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def suggest_alignment_range(
    layers: Sequence[int],
    divergence: Mapping[str, Sequence[float]] | Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    window: int = DEFAULT_WINDOW,
) -> AlignmentRange:
    """The suggested range (see the module docstring) of a curve over contiguous `layers`.

    Args:
        layers: The measured layers, contiguous and ascending.
        divergence: {language: per-layer values} (their mean is used) or one curve, one value
            per entry of `layers`.
        alpha: The threshold's fraction of the smoothed curve's span, in [0, 1].
        window: The odd width of the moving average, in layers.

    Raises:
        ValueError: A parameter is out of range, the layers are not contiguous, the curve's
            length differs from `layers`', or it holds a non-finite value.
    """
    check_range_parameters(alpha, window)
    layers = [int(x) for x in layers]
    curve = mean_curve(divergence) if isinstance(divergence, Mapping) else list(divergence)
    if not layers or len(curve) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(curve)} curve values")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"an alignment range needs contiguous measured layers, got {layers}")
    if not all(math.isfinite(v) for v in curve):
        raise ValueError("the divergence curve holds a non-finite value")
    smoothed = moving_average(curve, window)
    low, high = min(smoothed), max(smoothed)
    threshold = low + alpha * (high - low)
    # Rounding in the moving average must not split a flat stretch.
    tolerance = 1e-9 * max(abs(low), abs(high))
    best = None  # (length, -mean, -start) compared as a key: longer, lower mean, lower start
    start = None
    for i, value in enumerate(smoothed + [math.inf]):
        if value <= threshold + tolerance:
            start = i if start is None else start
            continue
        if start is not None:
            run = smoothed[start:i]
            key = (len(run), -sum(run) / len(run), -start)
            if best is None or key > best[0]:
                best = (key, start, i - 1)
            start = None
    _, first, last = best
    return AlignmentRange(layers[first], layers[last], threshold, float(alpha), window,
                          tuple(layers), tuple(smoothed))
