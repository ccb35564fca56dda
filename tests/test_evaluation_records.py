"""The evaluation's files: items.jsonl survives a torn last line, results and table as specified."""

import json
import statistics

import pytest

from sara_megatron.evaluation.records import (
    ItemRecordWriter, accuracy_summary, read_item_records, render_table,
)


def record(i, correct=True):
    return dict(benchmark="mgsm", language="sw", run=1, item_id=str(i), output=f"\\boxed{{{i}}}",
                extracted=str(i), gold=str(i), correct=correct)


def test_a_torn_last_line_is_ignored_and_cut_off_on_append(tmp_path):
    path = tmp_path / "items.jsonl"
    with ItemRecordWriter(path) as writer:
        writer.write(record(0))
        writer.write(record(1, correct=False))
    with open(path, "a", encoding="utf-8") as f:  # what a kill -9 mid-write leaves
        f.write(json.dumps(record(2))[:25])
    assert [r["item_id"] for r in read_item_records(path)] == ["0", "1"]
    with ItemRecordWriter(path) as writer:
        writer.write(record(3))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == ["0", "1", "3"]
    path.write_text(path.read_text(encoding="utf-8") + "not json\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="items.jsonl:4: not valid JSON"):
        read_item_records(path)


def test_summary_uses_the_sample_standard_deviation():
    runs = [88.0, 80.8, 83.2]
    summary = accuracy_summary(runs, 250)
    assert summary["mean"] == pytest.approx(statistics.mean(runs))
    assert summary["std"] == pytest.approx(statistics.stdev(runs))  # ddof 1
    assert summary["n"] == 250 and summary["runs"] == runs
    assert accuracy_summary([50.0], 4)["std"] is None


def test_table_has_the_papers_shape():
    benchmarks = {"global_mmlu": {"hi": accuracy_summary([74.5, 74.8], 10),
                                  "en": accuracy_summary([82.0, 83.0], 10)},
                  "mgsm": {"en": accuracy_summary([96.0, 97.0], 10)}}
    lines = render_table(benchmarks, ["hi", "en"], "SARA", runs=2).splitlines()
    assert lines[0] == "| Benchmark | Model | hi | en | Avg. |"
    assert lines[2] == "| Global-MMLU | SARA | 74.65 ± 0.21 | 82.50 ± 0.71 | 78.58 |"
    assert lines[3] == "| MGSM | SARA | – | 96.50 ± 0.71 | 96.50 |"
    assert "ddof 1" in lines[-1] and "2 runs" in lines[-1]
