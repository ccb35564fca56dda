"""Benchmarks read from local files in the hub's columns (the fixtures), as the hub would give them."""

import json
from pathlib import Path

import pytest

from sara_megatron.evaluation.benchmarks import (
    BENCHMARK_LANGUAGES, BenchmarkDataError, BenchmarkItem, load_benchmark,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.mark.parametrize("name", sorted(BENCHMARK_LANGUAGES))
def test_fixtures_load_with_the_same_item_ids_in_every_language(name):
    ids = None
    for language in BENCHMARK_LANGUAGES[name]:
        items = load_benchmark(name, language, data_dir=FIXTURES)
        assert all(isinstance(i, BenchmarkItem) and i.language == language for i in items)
        current = [i.item_id for i in items]
        assert ids is None or current == ids
        ids = current
    assert len(ids) == len(set(ids)) >= 3


def test_fields_map_from_the_hub_columns():
    mmlu = load_benchmark("global_mmlu", "bn", data_dir=FIXTURES)[0]
    assert mmlu.item_id == "elementary_mathematics/test/0"
    assert mmlu.options == ("৫৪", "৫৬", "৬৪", "৪৮") and mmlu.gold == "B" and mmlu.passage is None
    bele = load_benchmark("belebele", "te", data_dir=FIXTURES)
    assert bele[0].item_id == "https://en.wikibooks.org/wiki/Fixture/Library#1"
    assert bele[0].gold == "B" and bele[2].gold == "D"  # correct_answer_num "2" and "4"
    assert bele[0].passage.startswith("గ్రామ గ్రంథాలయం")
    mgsm = load_benchmark("mgsm", "zh", data_dir=FIXTURES, limit=2)
    assert [(i.item_id, i.gold, i.options) for i in mgsm] == [("0", "8", ()), ("1", "12", ())]


def test_mgsm_has_no_hindi_or_nepali():
    assert "hi" not in BENCHMARK_LANGUAGES["mgsm"] and "ne" not in BENCHMARK_LANGUAGES["mgsm"]
    with pytest.raises(ValueError, match="mgsm has no language 'hi'"):
        load_benchmark("mgsm", "hi", data_dir=FIXTURES)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", "en", data_dir=FIXTURES)


def test_bad_files_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="global_mmlu/en.jsonl"):
        load_benchmark("global_mmlu", "en", data_dir=tmp_path)
    (tmp_path / "belebele").mkdir()
    row = json.loads((FIXTURES / "belebele" / "en.jsonl").read_text().splitlines()[0])
    bad = dict(row, correct_answer_num="5")
    (tmp_path / "belebele" / "en.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"en.jsonl:2: correct_answer_num must be 1-4"):
        load_benchmark("belebele", "en", data_dir=tmp_path)
    (tmp_path / "mgsm").mkdir()
    (tmp_path / "mgsm" / "en.jsonl").write_text('{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match="en.jsonl:1: missing column.*answer_number"):
        load_benchmark("mgsm", "en", data_dir=tmp_path)


def test_a_repeated_id_gets_its_occurrence_as_a_suffix(tmp_path):
    (tmp_path / "global_mmlu").mkdir()
    lines = (FIXTURES / "global_mmlu" / "sw.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "global_mmlu" / "sw.jsonl").write_text(
        "\n".join(lines + [lines[0]]) + "\n", encoding="utf-8")
    ids = [i.item_id for i in load_benchmark("global_mmlu", "sw", data_dir=tmp_path)]
    assert ids[-1] == ids[0] + "~2" and len(set(ids)) == 4
