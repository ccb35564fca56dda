"""The automatic alignment range on synthetic curves with known valleys, and training reading it
from a divergence JSON file (`sara.layers: <file>`)."""

import json
import math
import random

import pytest

from sara_megatron.analysis.alignment_range import moving_average, suggest_alignment_range
from sara_megatron.sara import select_alignment_layers
from sara_megatron.training.config import load_train_config


def u_curve(num_layers, first, last, low=0.01, high=0.2):
    """High outside first..last, low inside."""
    return [low if first <= i <= last else high for i in range(num_layers)]


def test_u_shape_gives_its_valley():
    curve = {"hi": u_curve(48, 7, 34), "sw": u_curve(48, 7, 34, low=0.03, high=0.3)}
    found = suggest_alignment_range(range(48), curve, alpha=0.5, window=1)
    assert (found.first_layer, found.last_layer) == (7, 34)
    assert found.threshold == pytest.approx(0.02 + 0.5 * (0.25 - 0.02))


def test_smoothing_widens_nothing_when_the_valley_is_deep():
    # Window 3 mixes one high neighbour into each edge layer: (2*0.01+0.2)/3 = 0.073 <= 0.5
    # threshold 0.105, so the smoothed valley keeps its edges; a smaller alpha drops them.
    curve = u_curve(20, 5, 14)
    assert suggest_alignment_range(range(20), curve, 0.5, 3).layer_list == list(range(5, 15))
    assert suggest_alignment_range(range(20), curve, 0.2, 3).layer_list == list(range(6, 14))


def test_flat_curve_gives_every_layer():
    found = suggest_alignment_range(range(10), [0.1] * 10, alpha=0.3, window=5)
    assert (found.first_layer, found.last_layer) == (0, 9)


def test_two_valleys_longer_wins_and_equal_lengths_go_to_the_lower_mean_then_lower_layers():
    # valley A: layers 2..4 (3 layers), valley B: 8..13 (6 layers)
    curve = [1.0] * 16
    for i in list(range(2, 5)) + list(range(8, 14)):
        curve[i] = 0.1
    assert suggest_alignment_range(range(16), curve, 0.5, 1).layer_list == list(range(8, 14))
    # equal lengths, B deeper
    curve = [1.0] * 16
    for i in range(2, 6):
        curve[i] = 0.2
    for i in range(9, 13):
        curve[i] = 0.1
    assert suggest_alignment_range(range(16), curve, 0.5, 1).layer_list == list(range(9, 13))
    # equal lengths and depths: the lower layers
    for i in range(9, 13):
        curve[i] = 0.2
    assert suggest_alignment_range(range(16), curve, 0.5, 1).layer_list == list(range(2, 6))


def test_monotone_curve_gives_the_low_end():
    rising = [0.01 * i for i in range(11)]  # 0 .. 0.1, threshold 0.05 at alpha 0.5
    assert suggest_alignment_range(range(11), rising, 0.5, 1).layer_list == list(range(0, 6))
    falling = rising[::-1]
    assert suggest_alignment_range(range(11), falling, 0.5, 1).layer_list == list(range(5, 11))


def test_noisy_valley_needs_smoothing():
    # A flat-bottomed U (high 0.3 outside 6..25, 0.05 inside) with noise, and two single-layer
    # spikes inside the valley: unsmoothed, the valley breaks at them; a width-5 moving average
    # (a spike adds 0.2/5 to its neighbourhood) recovers the whole valley.
    rng = random.Random(3)
    curve = [v + rng.uniform(-0.01, 0.01) for v in u_curve(31, 6, 25, low=0.05, high=0.3)]
    for spike in (10, 20):
        curve[spike] += 0.2
    raw = suggest_alignment_range(range(31), curve, 0.5, 1)
    smooth = suggest_alignment_range(range(31), curve, 0.5, 5)
    assert raw.layer_list == list(range(11, 20))  # between the spikes only
    assert smooth.layer_list == list(range(6, 26))
    inside = [v for layer, v in zip(smooth.layers, smooth.smoothed) if layer in smooth.layer_list]
    assert max(inside) <= smooth.threshold


def test_moving_average_is_cut_at_the_ends():
    assert moving_average([3.0, 6.0, 9.0, 0.0], 3) == [4.5, 6.0, 5.0, 4.5]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]


def test_offset_layers_and_bad_parameters():
    found = suggest_alignment_range(range(7, 12), [0.3, 0.1, 0.1, 0.1, 0.3], 0.5, 1)
    assert (found.first_layer, found.last_layer) == (8, 10)
    with pytest.raises(ValueError, match="contiguous"):
        suggest_alignment_range([0, 1, 3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="odd"):
        suggest_alignment_range(range(3), [0.1, 0.2, 0.3], window=2)
    with pytest.raises(ValueError, match="alpha"):
        suggest_alignment_range(range(3), [0.1, 0.2, 0.3], alpha=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        suggest_alignment_range(range(3), [0.1, math.nan, 0.3])


def test_training_reads_the_range_file(tmp_path):
    path = tmp_path / "divergence.json"
    found = suggest_alignment_range(range(48), u_curve(48, 9, 30))
    path.write_text(json.dumps({"layers": list(range(48)), "divergence": {},
                                "suggested_range": found.to_json()}))
    cfg = load_train_config(None, [f"sara.layers={path}"])
    assert cfg.sara.layers == str(path)
    assert select_alignment_layers(48, cfg.sara.layers, family="qwen3_moe") == list(range(9, 31))
    with pytest.raises(ValueError, match="does not fit a model of 20 layers"):
        select_alignment_layers(20, str(path))
    with pytest.raises(ValueError, match="leave sara.first_layer and sara.last_layer unset"):
        load_train_config(None, [f"sara.layers={path}", "sara.first_layer=3"])
    (tmp_path / "bad.json").write_text(json.dumps({"layers": [0]}))
    with pytest.raises(ValueError, match="suggested_range"):
        load_train_config(None, [f"sara.layers={tmp_path / 'bad.json'}"])
    with pytest.raises(ValueError, match="sara.layers must be one of range, all, random, got"):
        load_train_config(None, [f"sara.layers={tmp_path / 'missing.json'}"])
