"""Expert usage per layer and language, and its heatmaps.

The JSON file (`tools/routing_divergence.py --expert-usage FILE`):

    {"layers": [...], "languages": ["en", "hi", ...], "anchor": "en", "top_k": 8, "num_experts": 128,
     "mean_probability":    {"hi": [[N floats] per layer], ...},   mean over the language's
                                                                   sequences of the sequence-mean
                                                                   dense routing (sums to 1)
     "selection_frequency": {"hi": [[N floats] per layer], ...}}   mean over sequences of the share
                                                                   of tokens whose top-k router
                                                                   logits hold the expert (sums to k)
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from sara_megatron.analysis.plotting import new_figure, save_png
from sara_megatron.io import atomic_open, read_json_file
from sara_megatron.tool_errors import InputError

HEATMAP_WIDTH, HEATMAP_HEIGHT = 1100, 640


@dataclasses.dataclass
class ExpertUsage:
    """Expert usage per layer and language, as in the JSON file above.

    Attributes:
        layers: The measured layers, global 0-based.
        anchor: The anchor language.
        top_k: The router's top-k.
        mean_probability: {language: `[layers][experts]` mean dense routing probability}.
        selection_frequency: {language: `[layers][experts]` share of tokens selecting each
            expert in their top-k}.
    """

    layers: list[int]
    anchor: str
    top_k: int
    mean_probability: dict[str, list[list[float]]]
    selection_frequency: dict[str, list[list[float]]]

    @property
    def languages(self) -> list[str]:
        """The languages, anchor first."""
        return list(self.mean_probability)

    @property
    def num_experts(self) -> int:
        """The number of experts per layer."""
        return len(next(iter(self.mean_probability.values()))[0])

    def to_json(self) -> dict:
        """The usage as the JSON file's dict."""
        return {"layers": self.layers, "languages": self.languages, "anchor": self.anchor,
                "top_k": self.top_k, "num_experts": self.num_experts,
                "mean_probability": self.mean_probability,
                "selection_frequency": self.selection_frequency}

    def matrix(self, kind: str, layer: int) -> np.ndarray:
        """[languages, experts] of 'mean_probability' or 'selection_frequency' at `layer`.

        Args:
            kind: "mean_probability" or "selection_frequency".
            layer: A measured layer.

        Returns:
            A float64 `[languages, experts]` array, rows in `languages` order.

        Raises:
            ValueError: `layer` was not measured.
        """
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not measured (measured: {self.layers})")
        index = self.layers.index(layer)
        table = getattr(self, kind)
        return np.array([table[lang][index] for lang in self.languages], dtype=np.float64)


def from_analysis(analysis) -> ExpertUsage:
    """From a `routing_analysis(..., top_k=k)` result.

    Args:
        analysis: A `RoutingAnalysis` measured with `top_k`.

    Returns:
        Its expert usage, the anchor language first.

    Raises:
        ValueError: The analysis was run without `top_k`.
    """
    if analysis.mean_probability is None:
        raise ValueError("the analysis has no expert usage: run it with top_k")
    order = [analysis.anchor] + [lang for lang in analysis.mean_probability
                                 if lang != analysis.anchor]
    return ExpertUsage(list(analysis.layers), analysis.anchor, analysis.top_k,
                       {lang: analysis.mean_probability[lang] for lang in order},
                       {lang: analysis.selection_frequency[lang] for lang in order})


def write_expert_usage(path: str | os.PathLike, usage: ExpertUsage) -> None:
    """Write expert usage as JSON, atomically.

    Args:
        path: The file to write.
        usage: The usage.
    """
    with atomic_open(path) as f:
        json.dump(usage.to_json(), f, ensure_ascii=False)
        f.write("\n")


def read_expert_usage(path: str | os.PathLike) -> ExpertUsage:
    """The expert usage in a JSON file.

    Args:
        path: The file `tools/routing_divergence.py --expert-usage` wrote.

    Raises:
        InputError: The file lacks a field or holds a malformed one.
    """
    obj = read_json_file(path)
    try:
        return ExpertUsage([int(x) for x in obj["layers"]], obj["anchor"], int(obj["top_k"]),
                           obj["mean_probability"], obj["selection_frequency"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not an expert-usage file: {err!r}") from None


def plot_expert_usage(usage: ExpertUsage, layer: int, path: str | os.PathLike) -> str:
    """Four heatmaps (experts across, languages down) at one layer: mean routing probability and
    top-k selection share, each beside its difference from the anchor's row.

    Args:
        usage: The expert usage.
        layer: A measured layer.
        path: Where the PNG is written.

    Returns:
        The PNG's path.
    """
    fig, axes = new_figure(HEATMAP_WIDTH, HEATMAP_HEIGHT, 2, 2)
    languages = usage.languages
    kinds = (("mean_probability", "mean routing probability"),
             ("selection_frequency", f"top-{usage.top_k} selection share"))
    for row, (kind, label) in enumerate(kinds):
        values = usage.matrix(kind, layer)
        difference = values - values[languages.index(usage.anchor)]
        bound = float(np.abs(difference).max()) or 1.0
        panels = ((values, label, "viridis", None, None),
                  (difference, f"{label} − {usage.anchor}", "RdBu_r", -bound, bound))
        for col, (data, title, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[row][col]
            image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            ax.set_yticks(range(len(languages)), languages)
            ax.set_xlabel("expert")
            ax.set_title(f"layer {layer}: {title}", fontsize=10)
            fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_png(fig, path)
