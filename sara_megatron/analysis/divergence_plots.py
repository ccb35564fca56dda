"""Layer-wise divergence figures: the U-curve with its aligned range (the paper's Figures 5, 6) and
several models side by side on a shared y-axis (Figure 2: before / FFT / SARA)."""

from __future__ import annotations

import os
from typing import Optional

from matplotlib.ticker import MaxNLocator

from sara_megatron.analysis.divergence_results import DivergenceResult, range_ratios
from sara_megatron.analysis.plotting import new_figure, save_png

U_CURVE_SIZE = (900, 500)
PANEL_WIDTH, PANEL_HEIGHT = 480, 420


def _label(normalized: bool) -> str:
    return "JS / mean entropy" if normalized else "JS divergence"


def _draw_curves(ax, result: DivergenceResult, normalized: bool,
                 aligned: Optional[tuple[int, int]]):
    if aligned is not None:
        ax.axvspan(aligned[0] - 0.5, aligned[1] + 0.5, color="tab:green", alpha=0.12,
                   label=f"aligned {aligned[0]}..{aligned[1]}")
    for language, curve in result.curves(normalized).items():
        ax.plot(result.layers, curve, marker="o", markersize=3, linewidth=1.4, label=language)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def suggested_range_of(result: DivergenceResult) -> Optional[tuple[int, int]]:
    """The result's suggested range as (first layer, last layer), or None when it has none.

    Args:
        result: A divergence result.
    """
    r = result.suggested_range
    return (r["first_layer"], r["last_layer"]) if r else None


def plot_u_curve(result: DivergenceResult, path: str | os.PathLike, *,
                 aligned: Optional[tuple[int, int]] = None, normalized: bool = False,
                 title: Optional[str] = None) -> str:
    """One line per language over layers, the aligned range shaded.

    Args:
        result: The divergence result to draw.
        path: Where the PNG is written.
        aligned: The (first, last) layers to shade; None: the result's suggested range, if any.
        normalized: Draw the entropy-normalised divergence instead of the JS divergence.
        title: The figure's title; None: one naming the anchor.

    Returns:
        The PNG's path.
    """
    aligned = aligned if aligned is not None else suggested_range_of(result)
    fig, axes = new_figure(*U_CURVE_SIZE)
    ax = axes[0][0]
    _draw_curves(ax, result, normalized, aligned)
    ax.set_ylabel(_label(normalized))
    anchor = f" vs {result.anchor}" if result.anchor else ""
    ax.set_title(title or f"layer-wise routing divergence{anchor}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save_png(fig, path)


def plot_divergence_comparison(results: dict[str, DivergenceResult], path: str | os.PathLike, *,
                               baseline: str, aligned: tuple[int, int],
                               normalized: bool = False) -> dict[str, float]:
    """One panel per result (e.g. before, FFT, SARA) on a shared y-axis, the aligned range shaded.

    Args:
        results: {name: divergence result}, one panel each, in this order.
        path: Where the PNG is written.
        baseline: The name of the result the others are compared with.
        aligned: The (first, last) layers to shade and to average over.
        normalized: Use the entropy-normalised divergence instead of the JS divergence.

    Returns:
        {name: its aligned-range mean divergence over the baseline's} (shown in each title).

    Raises:
        ValueError: `baseline` is not among `results`.
    """
    if baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among {', '.join(results)}")
    ratios = range_ratios(results, baseline, *aligned, normalized=normalized)
    fig, axes = new_figure(PANEL_WIDTH * len(results), PANEL_HEIGHT, 1, len(results), sharey=True)
    for ax, (name, result) in zip(axes[0], results.items()):
        _draw_curves(ax, result, normalized, aligned)
        ratio = "" if name == baseline else f"\naligned-range mean / {baseline}: {ratios[name]:.3f}"
        ax.set_title(f"{name}{ratio}", fontsize=10)
    axes[0][0].set_ylabel(_label(normalized))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return ratios
