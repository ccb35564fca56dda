"""Anchor sources read from local files in the hub's columns: stable ids, gold answers, options,
and bad rows named by file and line."""

import json
import math
from pathlib import Path

import pytest

from sara_megatron.answers import normalize_number
from sara_megatron.construction import sources
from sara_megatron.construction.sources import (
    SourceDataError,
    load_anchor_samples,
    parse_sources,
)

FIXTURES = Path(__file__).parent / "fixtures" / "construction"


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_gsm8k_ids_follow_rows_and_gold_follows_the_marker():
    samples = load_anchor_samples("gsm8k", "en", str(FIXTURES))
    raw = rows(FIXTURES / "gsm8k" / "train.jsonl")
    assert [s.id for s in samples] == [f"gsm8k-train-{i:05d}" for i in range(len(raw))]
    for sample, row in zip(samples, raw):
        assert sample.source == "gsm8k" and sample.language == "en" and sample.options == ()
        assert sample.question == row["question"]
        # The gold is the number after the last "####", separators dropped.
        stated = row["answer"].split("####")[-1]
        assert math.isclose(float(sample.gold), normalize_number(stated))
        assert "," not in sample.gold
    assert samples[2].gold == "1250"


def test_translated_gsm8k_keeps_the_english_ids():
    en = load_anchor_samples("gsm8k", "en", str(FIXTURES))
    zh = load_anchor_samples("gsm8k", "zh", str(FIXTURES))
    assert [s.id for s in zh] == [s.id for s in en[:len(zh)]]
    assert [s.gold for s in zh] == [s.gold for s in en[:len(zh)]]
    assert all(s.language == "zh" for s in zh)


def test_mmlu_prox_options_and_letters():
    samples = load_anchor_samples("mmlu_prox", "en", str(FIXTURES))
    raw = rows(FIXTURES / "mmlu_prox" / "en.jsonl")
    assert [s.id for s in samples] == [f"mmluprox-en-{r['question_id']}" for r in raw]
    for sample, row in zip(samples, raw):
        expected = [row[f"option_{i}"] for i in range(10) if row[f"option_{i}"] is not None]
        assert list(sample.options) == expected
        assert sample.gold == row["answer"] == "ABCDEFGHIJ"[row["answer_index"]]
        assert sample.is_multiple_choice
    assert len(samples[1].options) == 8  # a question with eight options: the nulls are dropped
    zh = load_anchor_samples("mmlu_prox", "zh", str(FIXTURES))
    assert {s.id.split("-")[-1] for s in zh} <= {s.id.split("-")[-1] for s in samples}


def test_limit_and_rerun_give_the_same_samples():
    first = load_anchor_samples("mmlu_prox", "en", str(FIXTURES), limit=2)
    again = load_anchor_samples("mmlu_prox", "en", str(FIXTURES))
    assert first == again[:2]
    assert load_anchor_samples("gsm8k", "en", str(FIXTURES), limit=0) == []


def write(path, rows_):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")


def mmlu_row(**overrides):
    row = {"question_id": 5, "question": "Q?", "answer": "B", "answer_index": 1,
           **{f"option_{i}": None for i in range(10)}, "option_0": "x", "option_1": "y",
           "option_2": "z"}
    row.update(overrides)
    return row


@pytest.mark.parametrize("source,row,message", [
    ("gsm8k", {"question": "How many?", "answer": "It is 5."}, "no '####'"),
    ("gsm8k", {"question": "How many?", "answer": "#### five"}, "not a number"),
    ("gsm8k", {"question": "", "answer": "#### 5"}, "'question'"),
    ("mmlu_prox", mmlu_row(answer="D"), "one of the 3 option letters"),
    ("mmlu_prox", mmlu_row(answer_index=2), "disagrees with 'answer_index'"),
    ("mmlu_prox", mmlu_row(option_1=None), "option before the last"),
    ("mmlu_prox", mmlu_row(question_id=None), "'question_id'"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, source, row, message):
    path = (tmp_path / "gsm8k" / "train.jsonl" if source == "gsm8k"
            else tmp_path / "mmlu_prox" / "en.jsonl")
    good = ({"question": "ok?", "answer": "#### 1"} if source == "gsm8k" else mmlu_row(question_id=1))
    write(path, [good, row])
    with pytest.raises(SourceDataError, match=rf"{path.name}:2: .*{message}"):
        load_anchor_samples(source, "en", str(tmp_path))


def test_duplicate_question_ids_are_refused(tmp_path):
    write(tmp_path / "mmlu_prox" / "en.jsonl", [mmlu_row(), mmlu_row()])
    with pytest.raises(SourceDataError, match="en.jsonl:2: duplicate sample id mmluprox-en-5"):
        load_anchor_samples("mmlu_prox", "en", str(tmp_path))


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gsm8k.train\.sw\.jsonl"):
        load_anchor_samples("gsm8k", "sw", str(tmp_path))
    with pytest.raises(ValueError, match="unknown source"):
        load_anchor_samples("math", "en", str(tmp_path))
    assert parse_sources("gsm8k, mmlu_prox,gsm8k") == ("gsm8k", "mmlu_prox")
    with pytest.raises(ValueError, match="unknown source"):
        parse_sources("gsm8k,mmlu")


def test_hub_path_asks_datasets_for_the_cards_ids(monkeypatch):
    """Without a data dir the rows come from datasets.load_dataset with the hub's names (the
    loader is replaced here: tests never download)."""
    calls = []

    def fake_hub(path, config, split):
        calls.append((path, config, split))
        if path == "openai/gsm8k":
            return [{"question": "1+1?", "answer": "#### 2"}]
        return [mmlu_row(question_id=9)]

    monkeypatch.setattr(sources, "_hub_rows", fake_hub)
    assert load_anchor_samples("gsm8k", "en")[0].id == "gsm8k-train-00000"
    assert load_anchor_samples("mmlu_prox", "zh")[0].id == "mmluprox-zh-9"
    assert calls == [("openai/gsm8k", "main", "train"), ("li-lab/MMLU-ProX", "zh", "test")]
    with pytest.raises(SourceDataError, match="English only"):
        load_anchor_samples("gsm8k", "zh")
