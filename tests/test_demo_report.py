"""The demo's last step: the divergence table it prints and the one in the report it writes are
the same, cell for cell. Run on the files the demo's steps leave in its work folder (divergence
results as tools/routing_divergence.py writes them, training JSON logs), not on a whole demo run,
which takes minutes."""

import json
import re

import numpy as np

from sara_megatron.analysis.alignment_range import suggest_alignment_range
from sara_megatron.analysis.expert_usage import ExpertUsage, write_expert_usage
from sara_megatron.demo import DEMO_DIVERGENCE, summarize_demo


def test_demo_report_divergence_table_matches_the_printed_one(tmp_path, capsys):
    rng = np.random.default_rng(0)
    layers = [0, 1, 2, 3]
    for scale, file in zip((1.0, 0.2, 0.7), DEMO_DIVERGENCE.values()):
        divergence = {lang: (scale * rng.uniform(1e-4, 3e-2, len(layers))).tolist()
                      for lang in ("hi", "sw")}
        found = suggest_alignment_range(layers, divergence)
        (tmp_path / file).write_text(json.dumps({"layers": layers, "divergence": divergence,
                                                 "anchor": "en",
                                                 "suggested_range": found.to_json()}))
    probs = {lang: rng.dirichlet(np.ones(8), size=len(layers)).tolist() for lang in ("en", "hi", "sw")}
    write_expert_usage(tmp_path / "divergence_base_usage.json", ExpertUsage(
        layers, "en", 2, probs, {k: (2 * np.array(v)).tolist() for k, v in probs.items()}))
    for name, js in (("sara", 0.02), ("fft", 0.05)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"step": s, "ce": 5.0 / s, "lb": 1.0, "js": js / s, "js_layer/1": js / s})
            + "\n" for s in range(1, 4)))

    report = summarize_demo(tmp_path)
    printed = capsys.readouterr().out
    printed_lines = printed.splitlines()
    header = next(i for i, line in enumerate(printed_lines) if line.split()[:2] == ["layer", "lang"])
    printed_rows = [line.split() for line in printed_lines[header + 2:]
                    if re.match(r"^\s*(\d+|mean)\s+\w+\s+\S+e[-+]\d+", line)]
    assert len(printed_rows) == len(layers) * 2 + 2

    text = report.read_text()
    table = text[text.index("## Routing divergence"):].splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| layer | lang |"))
    assert [c.strip() for c in table[start].strip("|").split("|")] == \
        ["layer", "lang", *DEMO_DIVERGENCE]
    report_rows = []
    for line in table[start + 2:]:
        if not line.startswith("|"):
            break
        report_rows.append([c.strip() for c in line.strip("|").split("|")])
    assert report_rows == printed_rows
    for name in ("training_dynamics.png", "divergence_u_curve.png", "divergence_comparison.png",
                 "expert_usage_layer0.png", "expert_usage_layer2.png", "expert_usage_layer3.png"):
        assert (report.parent / name).stat().st_size > 2000
