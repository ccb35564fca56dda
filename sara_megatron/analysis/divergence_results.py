"""The divergence JSON file that `tools/routing_divergence.py --json` writes, and what is read
from it.

    {"layers": [0, 1, ...],                      measured layers, global 0-based
     "divergence": {"hi": [JS per layer], ...},  mean over parallel groups of JS(anchor ‖ target)
     "normalized_divergence": {...},             optional: JS / mean entropy of the two
     "anchor": "en", "source": {...},            what was measured (checkpoint, data), optional
     "suggested_range": {"first_layer": 7, "last_layer": 34, "alpha": .., "window": .., ...},
     "shift_area": {"shift_layer": 12, "shift_back_layer": 15, "distance": {...}, ...}}

`suggested_range` is what training reads as `sara.layers: <file>` (see `alignment_range`);
`shift_area`, optional, is ShifCon's suggested area from the base model's language vectors
(`analysis/shift_area.py`, `--language-vectors`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from sara_megatron.io import atomic_open, read_json_file
from sara_megatron.tool_errors import InputError


@dataclasses.dataclass
class DivergenceResult:
    """A layer-wise divergence result, as in the JSON file above.

    Attributes:
        layers: The measured layers, global 0-based.
        divergence: {target language: JS divergence per layer}.
        normalized: {target language: JS / mean entropy per layer}, or None when not measured.
        anchor: The anchor language, when known.
        source: What was measured (checkpoint, data).
        suggested_range: `AlignmentRange.to_json()`, when suggested.
        shift_area: `ShiftArea.to_json()`, when language vectors were given.
    """

    layers: list[int]
    divergence: dict[str, list[float]]
    normalized: Optional[dict[str, list[float]]] = None
    anchor: Optional[str] = None
    source: dict = dataclasses.field(default_factory=dict)
    suggested_range: Optional[dict] = None
    shift_area: Optional[dict] = None  # ShiftArea.to_json(), when language vectors were given

    @property
    def languages(self) -> list[str]:
        """The target languages, in file order."""
        return list(self.divergence)

    def curves(self, normalized: bool = False) -> dict[str, list[float]]:
        """The per-layer curves, {target language: values}.

        Args:
            normalized: The entropy-normalised curves instead of the JS divergence.

        Raises:
            ValueError: `normalized` is asked for but was not measured.
        """
        if normalized:
            if self.normalized is None:
                raise ValueError("this result has no entropy-normalised divergence (measure it "
                                 "with --entropy-normalized)")
            return self.normalized
        return self.divergence

    def to_json(self) -> dict:
        """The result as the JSON file's dict (optional keys only when set)."""
        out = {"layers": list(self.layers), "divergence": self.divergence}
        if self.normalized is not None:
            out["normalized_divergence"] = self.normalized
        if self.anchor is not None:
            out["anchor"] = self.anchor
        if self.source:
            out["source"] = self.source
        if self.suggested_range is not None:
            out["suggested_range"] = self.suggested_range
        if self.shift_area is not None:
            out["shift_area"] = self.shift_area
        return out


def read_divergence(path: str | os.PathLike) -> DivergenceResult:
    """The divergence result in a JSON file.

    Args:
        path: The file `tools/routing_divergence.py --json` wrote.

    Raises:
        InputError: The file lacks `layers` or `divergence`, or a curve's length differs from
            the layers'.
    """
    obj = read_json_file(path)
    try:
        layers = [int(x) for x in obj["layers"]]
        divergence = {lang: [float(v) for v in values]
                      for lang, values in obj["divergence"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{path}: not a divergence result (layers, divergence): {err!r}") from None
    for lang, values in divergence.items():
        if len(values) != len(layers):
            raise InputError(f"{path}: {lang} has {len(values)} values for {len(layers)} layers")
    return DivergenceResult(layers, divergence, obj.get("normalized_divergence"),
                            obj.get("anchor"), obj.get("source") or {},
                            obj.get("suggested_range"), obj.get("shift_area"))


def write_divergence(path: str | os.PathLike, result: DivergenceResult) -> None:
    """Write a divergence result as JSON, atomically.

    Args:
        path: The file to write.
        result: The result.
    """
    with atomic_open(path) as f:
        json.dump(result.to_json(), f, indent=1, ensure_ascii=False)
        f.write("\n")


def range_mean(result: DivergenceResult, first: int, last: int, normalized: bool = False) -> float:
    """Mean divergence over languages and the measured layers in first..last.

    Args:
        result: The divergence result.
        first, last: The layer range, inclusive.
        normalized: Average the entropy-normalised divergence instead of the JS divergence.

    Returns:
        The mean.

    Raises:
        ValueError: No measured layer lies in the range.
    """
    curves = result.curves(normalized)
    values = [curve[i] for curve in curves.values()
              for i, layer in enumerate(result.layers) if first <= layer <= last]
    if not values:
        raise ValueError(f"no measured layer in {first}..{last}")
    return sum(values) / len(values)


def range_ratios(results: dict[str, DivergenceResult], baseline: str, first: int, last: int,
                 normalized: bool = False) -> dict[str, float]:
    """Per result, its aligned-range mean divergence over the baseline's (after / before).

    Args:
        results: {name: divergence result}.
        baseline: The name of the result the others are divided by.
        first, last: The aligned layer range, inclusive.
        normalized: Use the entropy-normalised divergence instead of the JS divergence.

    Returns:
        {name: range mean / the baseline's range mean}; NaN everywhere when the baseline's is 0.
    """
    base = range_mean(results[baseline], first, last, normalized)
    return {name: (range_mean(r, first, last, normalized) / base if base > 0 else float("nan"))
            for name, r in results.items()}
