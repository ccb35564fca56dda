"""tools/report.py: the numbers in report.md are those of its inputs (parsed back), the tests are
scipy's, every figure is a PNG of its size, and a section without inputs says what to run."""

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sara_megatron.analysis.divergence_plots import PANEL_HEIGHT, PANEL_WIDTH, U_CURVE_SIZE
from sara_megatron.analysis.divergence_results import DivergenceResult, write_divergence
from sara_megatron.analysis.expert_usage import HEATMAP_HEIGHT, HEATMAP_WIDTH, ExpertUsage, write_expert_usage
from sara_megatron.analysis.plotting import png_size
from sara_megatron.analysis.training_dynamics import DYNAMICS_HEIGHT, DYNAMICS_WIDTH

REPO = Path(__file__).resolve().parents[1]
LANGS = ["hi", "sw", "en"]


def load_tool():
    tool = importlib.import_module("sara_megatron.cli.report")
    return tool


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after `heading`."""
    part = text[text.index(heading):]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    start = part.splitlines().index(rows[0])
    rows = []
    for line in part.splitlines()[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # without header and rule


def make_inputs(root: Path, rng) -> dict:
    layers = list(range(8))
    divergence = {}
    for name, scale in (("before", 1.0), ("FFT", 0.7), ("SARA", 0.2)):
        curves = {lang: [scale * (0.01 + 0.1 * ((i - 3.5) / 3.5) ** 2 + rng.uniform(0, 0.005))
                         for i in layers] for lang in ("hi", "sw")}
        result = DivergenceResult(layers, curves, anchor="en")
        if name == "before":
            result.suggested_range = {"first_layer": 2, "last_layer": 5, "threshold": 0.04,
                                      "alpha": 0.5, "window": 3}
        write_divergence(root / f"div_{name}.json", result)
        divergence[name] = curves
    runs = {}
    for name, js in (("SARA", 0.1), ("FFT", 0.3)):
        records = [{"step": s, "ce": 2.0 + rng.uniform(0, 1), "lb": 1.0 + rng.uniform(0, 0.1),
                    "js": js / s, "js_layer/2": js / s, "js_layer/3": 1.5 * js / s}
                   for s in range(1, 6)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs[name] = records
    evaluations = {}
    for name, shift in (("base", 0.0), ("FFT", 5.0), ("SARA", 8.0)):
        folder = root / f"eval_{name}"
        folder.mkdir()
        benchmarks = {}
        items = []
        for benchmark, languages in (("global_mmlu", LANGS), ("mgsm", ["sw", "en"])):
            benchmarks[benchmark] = {}
            for language in languages:
                correct_runs = [[bool(rng.random() < 0.4 + shift / 50) for _ in range(20)]
                                for _ in range(3)]
                accs = [100.0 * sum(c) / 20 for c in correct_runs]
                benchmarks[benchmark][language] = {"runs": accs, "mean": float(np.mean(accs)),
                                                   "std": float(np.std(accs, ddof=1)), "n": 20}
                for run, flags in enumerate(correct_runs):
                    for i, flag in enumerate(flags):
                        items.append({"benchmark": benchmark, "language": language, "run": run,
                                      "item_id": f"q{i}", "output": "...", "extracted": "A",
                                      "gold": "A" if flag else "B", "correct": flag})
        (folder / "results.json").write_text(json.dumps({"settings": {}, "benchmarks": benchmarks}))
        if name != "base":  # the base model has no item records: no item-level test against it
            (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        evaluations[name] = benchmarks
    for step, acc in ((10, 30.0), (20, 40.0)):
        folder = root / f"eval_SARA_{step}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"settings": {}, "benchmarks": {
            "mgsm": {"sw": {"runs": [acc], "mean": acc, "std": None, "n": 20},
                     "en": {"runs": [acc + 10], "mean": acc + 10, "std": None, "n": 20}}}}))
    probs = {lang: rng.dirichlet(np.ones(4), size=len(layers)).tolist() for lang in ("en", "hi", "sw")}
    write_expert_usage(root / "usage.json", ExpertUsage(layers, "en", 2, probs,
                                                        {k: (2 * np.array(v)).tolist() for k, v in probs.items()}))
    return {"divergence": divergence, "runs": runs, "evaluations": evaluations}


def test_report_numbers_match_inputs(tmp_path):
    rng = np.random.default_rng(7)
    inputs = make_inputs(tmp_path, rng)
    out = tmp_path / "report"
    argv = ["--out", str(out)]
    for name in ("before", "FFT", "SARA"):
        argv += ["--divergence", f"{name}={tmp_path / f'div_{name}.json'}"]
    for name in ("SARA", "FFT"):
        argv += ["--run", f"{name}={tmp_path / f'{name}.jsonl'}"]
    for name in ("base", "FFT", "SARA"):
        argv += ["--eval", f"{name}={tmp_path / f'eval_{name}'}"]
    argv += ["--baseline", "FFT", "--checkpoint-eval", f"SARA:20={tmp_path / 'eval_SARA_20'}",
             "--checkpoint-eval", f"SARA:10={tmp_path / 'eval_SARA_10'}",
             "--expert-usage", str(tmp_path / "usage.json"), "--usage-layers", "3",
             "--bootstrap-resamples", "500"]
    load_tool().main(argv)
    text = (out / "report.md").read_text()
    assert "Left out" not in text

    # divergence table: every (layer, language) and the means, to the printed 4 digits
    rows = table_rows(text, "## Routing divergence")
    div = inputs["divergence"]
    assert len(rows) == 8 * 2 + 2
    for row in rows:
        layer, lang, *cells = row
        for name, cell in zip(("before", "FFT", "SARA"), cells):
            expected = (np.mean(div[name][lang]) if layer == "mean"
                        else div[name][lang][int(layer)])
            assert float(cell) == pytest.approx(expected, rel=6e-4)
    assert "Layers **2..5** (from `before`, saved in the divergence result)" in text
    ratios = {r[0]: (float(r[1]), float(r[2])) for r in table_rows(text, "| result | aligned-range mean | ratio |")}
    before = np.mean([div["before"][lang][2:6] for lang in ("hi", "sw")])
    for name in ("before", "FFT", "SARA"):
        mean = np.mean([div[name][lang][2:6] for lang in ("hi", "sw")])
        assert ratios[name][0] == pytest.approx(mean, rel=6e-4)
        assert ratios[name][1] == pytest.approx(mean / before, abs=6e-5)

    # training dynamics table
    for row in table_rows(text, "## Training dynamics"):
        name, steps, *cells = row
        records = inputs["runs"][name]
        assert steps == "1..5"
        expected = [records[i][k] for k in ("ce", "lb", "js") for i in (0, -1)]
        assert [float(c) for c in cells] == pytest.approx(expected, rel=1e-3)

    # accuracy table: mean ± std per language, Avg.
    evaluations = inputs["evaluations"]
    header = text[text.index("## Accuracy"):].splitlines()[2]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["Benchmark", "Model", "hi", "sw", "en", "Avg."]
    titles = {"Global-MMLU": "global_mmlu", "MGSM": "mgsm"}
    rows = table_rows(text, "## Accuracy")
    assert len(rows) == 3 + 3
    for benchmark_title, model, *cells, average in rows:
        per_language = evaluations[model][titles[benchmark_title]]
        means = []
        for lang, cell in zip(("hi", "sw", "en"), cells):
            if lang not in per_language:
                assert cell == "–"
                continue
            mean, std = (float(x) for x in cell.split("±"))
            assert mean == pytest.approx(per_language[lang]["mean"], abs=0.005)
            assert std == pytest.approx(per_language[lang]["std"], abs=0.005)
            means.append(per_language[lang]["mean"])
        assert float(average) == pytest.approx(np.mean(means), abs=0.005)

    # significance against FFT, checked with scipy's paired t-test and binomial test
    rows = table_rows(text, "## Significance")
    assert {(r[0], r[1]) for r in rows} == {("global_mmlu", "base"), ("global_mmlu", "SARA"),
                                            ("mgsm", "base"), ("mgsm", "SARA")}
    for benchmark, model, languages, diff, t, df, p1, p2, mcnemar, bootstrap in rows:
        languages = languages.split(",")
        a = [evaluations[model][benchmark][lang]["mean"] for lang in languages]
        b = [evaluations["FFT"][benchmark][lang]["mean"] for lang in languages]
        assert float(diff) == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-4)
        assert float(t) == pytest.approx(stats.ttest_rel(a, b).statistic, abs=1e-4)
        assert int(df) == len(languages) - 1
        assert float(p1) == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue, rel=1e-3)
        assert float(p2) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-3)
        if model == "base":
            assert mcnemar == "–" and bootstrap == "–"
            continue
        items = [json.loads(line) for line in
                 (tmp_path / f"eval_{model}" / "items.jsonl").read_text().splitlines()]
        base_items = [json.loads(line) for line in
                      (tmp_path / "eval_FFT" / "items.jsonl").read_text().splitlines()]
        first = lambda recs: {(r["language"], r["item_id"]): r["correct"] for r in recs  # noqa: E731
                              if r["benchmark"] == benchmark and r["run"] == 0}
        t_items, b_items = first(items), first(base_items)
        only_t = sum(t_items[k] and not b_items[k] for k in t_items)
        only_b = sum(b_items[k] and not t_items[k] for k in t_items)
        reference = stats.binomtest(only_t, only_t + only_b, 0.5, alternative="greater").pvalue
        assert float(mcnemar) == pytest.approx(reference, rel=1e-3)
        difference = float(bootstrap.split("[")[0])
        scores = lambda recs: {k: np.mean([r["correct"] for r in recs  # noqa: E731
                                           if r["benchmark"] == benchmark
                                           and (r["language"], r["item_id"]) == k])
                               for k in t_items}
        st, sb = scores(items), scores(base_items)
        assert difference == pytest.approx(100 * np.mean([st[k] - sb[k] for k in st]), abs=0.005)

    # accuracy by checkpoint: mean over languages per step
    rows = table_rows(text, "## Accuracy by checkpoint")
    assert rows == [["mgsm", "SARA", "10", "35.00"], ["mgsm", "SARA", "20", "45.00"]]

    sizes = {"divergence_u_curve.png": U_CURVE_SIZE,
             "divergence_comparison.png": (3 * PANEL_WIDTH, PANEL_HEIGHT),
             "expert_usage_layer3.png": (HEATMAP_WIDTH, HEATMAP_HEIGHT),
             "training_dynamics.png": (DYNAMICS_WIDTH, DYNAMICS_HEIGHT)}
    for name, size in sizes.items():
        assert f"]({name})" in text
        assert png_size(out / name) == size
    assert (out / "accuracy_by_checkpoint.png").stat().st_size > 2000


def test_missing_inputs_leave_sections_out_saying_what_to_run(tmp_path, capsys):
    rng = np.random.default_rng(1)
    make_inputs(tmp_path, rng)
    tool = load_tool()
    tool.main(["--out", str(tmp_path / "r"), "--run", f"SARA={tmp_path / 'SARA.jsonl'}"])
    text = (tmp_path / "r" / "report.md").read_text()
    assert "training_dynamics.png" in text
    for line in ("Left out: no divergence result given. To include it, run "
                 "`python tools/routing_divergence.py",
                 "Left out: no evaluation given. To include it, run `python tools/evaluate.py",
                 "Left out: no baseline and method to compare.",
                 "Left out: no expert-usage file given.",
                 "Left out: no evaluation of intermediate checkpoints."):
        assert line in text
    assert not (tmp_path / "r" / "divergence_u_curve.png").exists()

    # The range is computed when the baseline result holds none; bad inputs exit 2.
    tool.main(["--out", str(tmp_path / "r2"), "--divergence", f"FFT={tmp_path / 'div_FFT.json'}",
               "--range-alpha", "0.3", "--range-window", "1"])
    assert re.search(r"Layers \*\*\d+\.\.\d+\*\* \(from `FFT`, computed here \(alpha 0.3, window 1\)\)",
                     (tmp_path / "r2" / "report.md").read_text())
    for argv, message in (
            (["--eval", f"a={tmp_path / 'eval_FFT'}", "--eval", f"b={tmp_path / 'eval_SARA'}",
              "--baseline", "c"], "baseline 'c' is not among"),
            (["--run", "nameless"], "expected NAME=PATH"),
            (["--run", f"x={tmp_path / 'none.jsonl'}"], "no such file"),
            (["--checkpoint-eval", f"SARA={tmp_path / 'eval_SARA_10'}"], "RUN:STEP=DIR")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--out", str(tmp_path / "r3"), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
