"""ShifCon's layer area from a subspace distance between language representations, per layer.

At each layer, the distance of a target language from the anchor is the norm of the projection of
their language vectors' difference onto the languages' mean-centred subspace (the low-rank form
of LSAR, Xie et al., 2022; at full rank their Euclidean distance); the curve is the mean over
targets, and the suggested area is its valley by the alignment-range rule
(`analysis/alignment_range.py`): `shifcon.shift_layer` its first layer, `shifcon.shift_back_layer`
its last, a one-layer valley widened to the next layer. The sources and the steps in full:
docs/analysis.md, "ShifCon's layer area".
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import torch

from sara_megatron.analysis.alignment_range import (
    DEFAULT_ALPHA,
    DEFAULT_WINDOW,
    suggest_alignment_range,
)


@dataclasses.dataclass(frozen=True)
class ShiftArea:
    """A suggested ShifCon area and the curve it comes from.

    Attributes:
        shift_layer: The layer whose input is shifted (`shifcon.shift_layer`).
        shift_back_layer: The layer whose input is shifted back (`shifcon.shift_back_layer`).
        layers: The layers the curve covers.
        distance: language -> per-layer subspace distance from the anchor.
        rule: The valley rule's parameters and threshold (`AlignmentRange.to_json`).
    """

    shift_layer: int
    shift_back_layer: int
    layers: tuple[int, ...]
    distance: dict[str, list[float]]
    rule: dict

    def to_json(self) -> dict:
        """The area as the divergence result stores it (`shift_area`)."""
        return {"shift_layer": self.shift_layer, "shift_back_layer": self.shift_back_layer,
                "layers": list(self.layers), "distance": self.distance,
                "metric": "subspace distance of L2-normalised sentence means from the anchor",
                **{k: v for k, v in self.rule.items() if k not in ("first_layer", "last_layer")}}


def subspace_distances(vectors: Mapping[str, torch.Tensor], anchor: str,
                       rank: Optional[int] = None) -> dict[str, list[float]]:
    """Per layer, each target language's subspace distance from the anchor (module docstring).

    Args:
        vectors: language -> [L, H] representations per layer (the anchor's included; at least
            one other language).
        anchor: The anchor language.
        rank: Directions kept of the language-specific subspace; None: all (languages − 1).

    Returns:
        {target language: [L] distances}.

    Raises:
        ValueError: No anchor or no target among `vectors`, shapes that differ, or a rank < 1.
    """
    if anchor not in vectors:
        raise ValueError(f"no representation of the anchor {anchor!r} (have {sorted(vectors)})")
    names = sorted(vectors)
    targets = [name for name in names if name != anchor]
    if not targets:
        raise ValueError("the subspace distance needs a target language beside the anchor")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    stacked = torch.stack([vectors[name].double() for name in names])  # [k, L, H]
    if stacked.dim() != 3:
        raise ValueError(f"representations must be [L, H], got {tuple(stacked.shape[1:])}")
    out = {name: [] for name in targets}
    for layer in range(stacked.shape[1]):
        means = stacked[:, layer]  # [k, H]
        centred = (means - means.mean(0)).T  # [H, k]
        basis, singular, _ = torch.linalg.svd(centred, full_matrices=False)
        keep = len(names) - 1 if rank is None else min(rank, len(names) - 1)
        basis = basis[:, :keep]  # [H, r]: the language-specific subspace M_s
        for name in targets:
            diff = means[names.index(name)] - means[names.index(anchor)]
            out[name].append(float((basis.T @ diff).norm()))
    return out


def suggest_shift_area(layers: Sequence[int], distance: Mapping[str, Sequence[float]],
                       alpha: float = DEFAULT_ALPHA, window: int = DEFAULT_WINDOW,
                       num_layers: Optional[int] = None) -> ShiftArea:
    """ShifCon's shift and shift-back layers from a subspace-distance curve.

    Args:
        layers: The contiguous layers the curve covers.
        distance: language -> per-layer distance from the anchor (their mean is the curve).
        alpha: The valley threshold's share of the curve's range (as for SARA's range).
        window: The odd moving-average width.
        num_layers: The model's layer count, bounding the widened shift-back layer; None: the
            last measured layer + 1.

    Returns:
        The suggested area.

    Raises:
        ValueError: Layers with gaps, a curve of another length, or parameters out of range.
    """
    found = suggest_alignment_range(layers, dict(distance), alpha, window)
    first, last = found.first_layer, found.last_layer
    if last == first:  # the two layers must differ: widen by one, within the model
        limit = (num_layers - 1) if num_layers is not None else int(layers[-1]) + 1
        last = first + 1 if first + 1 <= limit else first
        first = first - 1 if last == first else first
    return ShiftArea(first, last, tuple(int(x) for x in layers),
                     {k: [float(v) for v in c] for k, c in distance.items()},
                     found.to_json("subspace_distance"))


def shift_area_from_vectors(vectors, alpha: float = DEFAULT_ALPHA, window: int = DEFAULT_WINDOW,
                            rank: Optional[int] = None,
                            num_layers: Optional[int] = None) -> ShiftArea:
    """The suggested ShifCon area of a language-vector file taken over contiguous layers.

    Args:
        vectors: `LanguageVectors` (`sara/shifcon_vectors.py`) with `sentence_l2`
            normalisation, over the layers to consider (e.g. every layer of the base model).
        alpha: The valley threshold's share of the curve's range.
        window: The odd moving-average width.
        rank: Directions kept of the language-specific subspace; None: all.
        num_layers: The model's layer count (see `suggest_shift_area`).

    Returns:
        The suggested area.

    Raises:
        ValueError: Vectors of raw token means (their scale differs from layer to layer), or
            anything `subspace_distances` / `suggest_shift_area` refuse.
    """
    if vectors.normalisation != "sentence_l2":
        raise ValueError("the shift area needs language vectors of L2-normalised sentence means "
                         f"(extract them with --normalisation sentence_l2), these are "
                         f"{vectors.normalisation}")
    distance = subspace_distances(vectors.vectors, vectors.anchor_language, rank)
    return suggest_shift_area(vectors.layers, distance, alpha, window, num_layers)
