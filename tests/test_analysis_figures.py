"""Each figure is made from small inputs and is a PNG of the expected pixel size; the numbers the
figures report (aligned-range ratios) follow from their inputs."""

import json

import numpy as np
import pytest

from sara_megatron.analysis.alignment_range import suggest_alignment_range
from sara_megatron.analysis.divergence_plots import (
    PANEL_HEIGHT,
    PANEL_WIDTH,
    U_CURVE_SIZE,
    plot_divergence_comparison,
    plot_u_curve,
)
from sara_megatron.analysis.divergence_results import (
    DivergenceResult,
    read_divergence,
    write_divergence,
)
from sara_megatron.analysis.expert_usage import (
    HEATMAP_HEIGHT,
    HEATMAP_WIDTH,
    ExpertUsage,
    plot_expert_usage,
    read_expert_usage,
    write_expert_usage,
)
from sara_megatron.analysis.plotting import png_size
from sara_megatron.analysis.training_dynamics import (
    ACCURACY_HEIGHT,
    ACCURACY_PANEL_WIDTH,
    DYNAMICS_HEIGHT,
    DYNAMICS_WIDTH,
    logged_layers,
    plot_accuracy_by_checkpoint,
    plot_training_dynamics,
    read_json_log,
)


def u_result(scale: float, layers=range(12)) -> DivergenceResult:
    layers = list(layers)
    curve = lambda depth: [scale * (0.02 + depth * ((i - 5.5) / 5.5) ** 2) for i in layers]  # noqa: E731
    result = DivergenceResult(layers, {"hi": curve(0.2), "sw": curve(0.3)},
                              normalized={"hi": curve(0.1), "sw": curve(0.15)}, anchor="en")
    found = suggest_alignment_range(layers, result.divergence, alpha=0.3, window=3)
    result.suggested_range = found.to_json()
    return result


def assert_png(path, size):
    assert path.stat().st_size > 2000  # a drawn figure, not an empty canvas
    assert png_size(path) == size


def test_u_curve_and_divergence_json_round_trip(tmp_path):
    result = u_result(1.0)
    write_divergence(tmp_path / "d.json", result)
    back = read_divergence(tmp_path / "d.json")
    assert back.divergence == result.divergence and back.normalized == result.normalized
    assert back.suggested_range["first_layer"] == result.suggested_range["first_layer"]
    plot_u_curve(back, tmp_path / "u.png")
    assert_png(tmp_path / "u.png", U_CURVE_SIZE)
    plot_u_curve(back, tmp_path / "u_norm.png", normalized=True, aligned=(3, 8))
    assert_png(tmp_path / "u_norm.png", U_CURVE_SIZE)


def test_comparison_figure_and_range_ratios(tmp_path):
    results = {"before": u_result(1.0), "FFT": u_result(0.6), "SARA": u_result(0.1)}
    ratios = plot_divergence_comparison(results, tmp_path / "cmp.png", baseline="before",
                                        aligned=(3, 8))
    assert_png(tmp_path / "cmp.png", (3 * PANEL_WIDTH, PANEL_HEIGHT))
    # Each result is the baseline scaled, so its ratio is the scale; checked against a mean
    # computed here from the curves.
    assert ratios == pytest.approx({"before": 1.0, "FFT": 0.6, "SARA": 0.1})
    sara = np.array(list(results["SARA"].divergence.values()))[:, 3:9].mean()
    before = np.array(list(results["before"].divergence.values()))[:, 3:9].mean()
    assert ratios["SARA"] == pytest.approx(sara / before)
    with pytest.raises(ValueError, match="baseline"):
        plot_divergence_comparison(results, tmp_path / "x.png", baseline="base", aligned=(3, 8))


def test_expert_usage_heatmaps(tmp_path):
    rng = np.random.default_rng(0)
    layers, experts = [1, 2], 8
    probs = {lang: rng.dirichlet(np.ones(experts), size=len(layers)).tolist()
             for lang in ("en", "hi", "sw")}
    chosen = {lang: (2 * rng.dirichlet(np.ones(experts), size=len(layers))).tolist()
              for lang in ("en", "hi", "sw")}
    usage = ExpertUsage(layers, "en", 2, probs, chosen)
    write_expert_usage(tmp_path / "usage.json", usage)
    back = read_expert_usage(tmp_path / "usage.json")
    assert back.num_experts == experts and back.languages == ["en", "hi", "sw"]
    assert np.allclose(back.matrix("selection_frequency", 2)[1], chosen["hi"][1])
    plot_expert_usage(back, 2, tmp_path / "usage_2.png")
    assert_png(tmp_path / "usage_2.png", (HEATMAP_WIDTH, HEATMAP_HEIGHT))
    with pytest.raises(ValueError, match="not measured"):
        plot_expert_usage(back, 5, tmp_path / "x.png")


def write_log(path, steps, js_scale, layers=(1, 2)):
    with open(path, "w") as f:
        for step in steps:
            record = {"step": step, "ce": 3.0 / step, "lb": 1.0 + 0.01 * step,
                      "js": js_scale / step, "grad_norm": None}
            record.update({f"js_layer/{layer}": js_scale * layer / step for layer in layers})
            f.write(json.dumps(record) + "\n")


def test_training_dynamics_and_accuracy_figures(tmp_path):
    write_log(tmp_path / "sara.jsonl", range(1, 11), 0.05)
    write_log(tmp_path / "fft.jsonl", range(1, 11), 0.2)
    runs = {name: read_json_log(tmp_path / f"{name}.jsonl") for name in ("sara", "fft")}
    assert logged_layers(runs["sara"]) == [1, 2]
    assert runs["fft"][4]["js_layer/2"] == pytest.approx(0.2 * 2 / 5)
    plot_training_dynamics(runs, tmp_path / "dyn.png")
    assert_png(tmp_path / "dyn.png", (DYNAMICS_WIDTH, DYNAMICS_HEIGHT))
    points = {"mgsm": {"sara": [(10, 40.0), (20, 55.0)], "fft": [(10, 45.0), (20, 50.0)]},
              "global_mmlu": {"sara": [(10, 30.0), (20, 35.0)], "fft": [(20, 33.0), (10, 31.0)]}}
    plot_accuracy_by_checkpoint(points, tmp_path / "acc.png")
    assert_png(tmp_path / "acc.png", (2 * ACCURACY_PANEL_WIDTH, ACCURACY_HEIGHT))
    (tmp_path / "bad.jsonl").write_text('{"ce": 1.0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_json_log(tmp_path / "bad.jsonl")
