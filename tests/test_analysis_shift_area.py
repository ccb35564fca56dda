"""ShifCon's layer area from the subspace distance of language vectors (analysis/shift_area.py):
on constructed vectors whose languages meet in known middle layers the suggestion is those layers;
the distance is the Euclidean one at full rank and its projection at lower rank; the area travels
in the divergence result and shows in the report."""

import pytest
import torch

from sara_megatron.analysis.divergence_results import (
    DivergenceResult,
    read_divergence,
    write_divergence,
)
from sara_megatron.analysis.report import shift_area_lines
from sara_megatron.analysis.shift_area import (
    shift_area_from_vectors,
    subspace_distances,
    suggest_shift_area,
)
from sara_megatron.sara.shifcon_vectors import LanguageVectors

OFFSETS = [1.0, 0.9, 0.8, 0.7, 0.1, 0.08, 0.1, 0.09, 0.1, 0.8, 0.9, 1.0]  # valley: layers 4..8


def _vectors(offsets, normalisation="sentence_l2"):
    """en (anchor), hi and sw over len(offsets) layers; at layer l, hi and sw sit offsets[l] and
    2·offsets[l] away from en along directions of their own."""
    g = torch.Generator().manual_seed(0)
    layers, hidden = len(offsets), 16
    en = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=-1)
    d_hi = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=-1)
    d_sw = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=-1)
    scale = torch.tensor(offsets).unsqueeze(-1)
    vectors = {"en": en, "hi": en + scale * d_hi, "sw": en + 2 * scale * d_sw}
    return LanguageVectors(tuple(range(layers)), vectors, "en", "fp",
                           {k: 10 for k in vectors}, normalisation)


def test_the_valley_of_a_constructed_case_is_the_area():
    vectors = _vectors(OFFSETS)
    area = shift_area_from_vectors(vectors, alpha=0.5, window=1)
    assert (area.shift_layer, area.shift_back_layer) == (4, 8)
    # Full rank: the distance is the Euclidean distance from the anchor.
    torch.testing.assert_close(torch.tensor(area.distance["hi"]), torch.tensor(OFFSETS),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(area.distance["sw"]),
                               2 * torch.tensor(OFFSETS), rtol=1e-6, atol=1e-7)
    # Shifting the curve's valley moves the suggestion with it.
    moved = OFFSETS[3:] + OFFSETS[:3]
    area = shift_area_from_vectors(_vectors(moved), alpha=0.5, window=1)
    assert (area.shift_layer, area.shift_back_layer) == (1, 5)


def test_a_lower_rank_projects_onto_the_language_subspace():
    vectors = _vectors(OFFSETS).vectors
    full = subspace_distances(vectors, "en")
    one = subspace_distances(vectors, "en", rank=1)
    for language in ("hi", "sw"):
        assert all(a <= b + 1e-9 for a, b in zip(one[language], full[language]))
    # An independent computation of the rank-1 distance at one layer.
    layer = 2
    means = torch.stack([vectors[k][layer].double() for k in ("en", "hi", "sw")])
    u, _, _ = torch.linalg.svd((means - means.mean(0)).T, full_matrices=False)
    want = float((u[:, 0] @ (means[2] - means[0])).abs())
    assert one["sw"][layer] == pytest.approx(want, rel=1e-9)
    assert one["sw"][layer] < full["sw"][layer] - 1e-6  # sw and hi point different ways


def test_a_one_layer_valley_is_widened_and_raw_token_means_are_refused():
    curve = {"hi": [1.0, 1.0, 0.0, 1.0, 1.0]}
    area = suggest_shift_area(range(5), curve, alpha=0.1, window=1)
    assert (area.shift_layer, area.shift_back_layer) == (2, 3)
    at_the_end = suggest_shift_area(range(5), {"hi": [1.0, 1.0, 1.0, 1.0, 0.0]}, alpha=0.1,
                                    window=1, num_layers=5)
    assert (at_the_end.shift_layer, at_the_end.shift_back_layer) == (3, 4)
    with pytest.raises(ValueError, match="sentence_l2"):
        shift_area_from_vectors(_vectors(OFFSETS, "token_mean"))


def test_the_area_travels_in_the_divergence_result_and_shows_in_the_report(tmp_path):
    area = shift_area_from_vectors(_vectors(OFFSETS), alpha=0.5, window=1)
    result = DivergenceResult(list(range(12)), {"hi": [0.1] * 12}, anchor="en",
                              shift_area=area.to_json())
    write_divergence(tmp_path / "d.json", result)
    read = read_divergence(tmp_path / "d.json")
    assert read.shift_area["shift_layer"] == 4 and read.shift_area["shift_back_layer"] == 8
    text = "\n".join(shift_area_lines(read, "base"))
    assert "`shifcon.shift_layer: 4`, `shifcon.shift_back_layer: 8`" in text
    assert "| 4 | hi | 1.000e-01 |" in text
    assert shift_area_lines(DivergenceResult([0], {"hi": [0.0]}), "base") == []
