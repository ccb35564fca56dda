"""The correctness filter and decontamination on fixtures of tricky model outputs: each sample
kept or dropped for the labelled reason, kept ones valid corpus records that shard_corpus takes."""

import importlib
import json
import shutil
from pathlib import Path

import pytest

from sara_megatron.construction.decontamination import (
    ContaminationIndex,
    build_index,
    normalized_words,
    parse_benchmarks,
)
from sara_megatron.construction.filtering import (
    AnswerRecordError,
    filter_answers,
    read_answer_records,
)
from sara_megatron.data.corpus_validation import validate_corpus

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "construction"
BENCHMARKS = REPO / "tests" / "fixtures" / "benchmarks"
# Questions of the answer fixtures that overlap a benchmark fixture question: a 13-gram shared with
# an MGSM question (gsm8k 3), the whole of a short Global-MMLU question (mmlu-prox 73).
CONTAMINATED = {
    "en": {"gsm8k-train-00003": "mgsm", "mmluprox-en-73": "global_mmlu",
           "mmluprox-en-73-cut": "global_mmlu"},
    "zh": {"gsm8k-train-00003": "mgsm", "mmluprox-zh-73": "global_mmlu"},
}


def load_tool(name):
    tool = importlib.import_module(f"sara_megatron.cli.{name}")
    return tool


def outcomes(result):
    """(id, reason or "kept") in input order, duplicates included."""
    return [(r["id"], r["reason"]) for r in result.dropped] + [(r["id"], "kept") for r in result.kept]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_each_sample_is_kept_or_dropped_for_its_labelled_reason(language):
    records = list(read_answer_records([FIXTURES / f"answers_{language}.jsonl"]))
    result = filter_answers(records)
    assert sorted(outcomes(result)) == sorted((r["id"], r["expect"]) for r in records)
    counts = result.summary()
    assert counts["total"] == len(records)
    assert counts["kept"] + sum(counts["dropped"].values()) == len(records)
    for source, c in counts["by_source"].items():
        expected = [r for r in records if r["source"] == source]
        assert c["total"] == len(expected)
        assert c["kept"] == sum(r["expect"] == "kept" for r in expected)
        assert c["kept_share"] == pytest.approx(c["kept"] / c["total"], abs=1e-4)


def test_kept_records_are_the_prompt_and_the_verified_reply():
    records = list(read_answer_records([FIXTURES / "answers_en.jsonl"]))
    result = filter_answers(records)
    first = {}
    for r in records:
        first.setdefault(r["id"], r)
    for out in result.kept:
        src = first[out["id"]]
        assert out["lang"] == "en" and out["source"] == src["source"] and out["answer"] == src["gold"]
        assert out["messages"][:-1] == src["messages"]
        assert out["messages"][-1] == {"role": "assistant", "content": src["output"]}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_decontamination_against_the_benchmark_fixtures(language):
    records = list(read_answer_records([FIXTURES / f"answers_{language}.jsonl"]))
    index, notes = build_index(parse_benchmarks("global_mmlu,belebele,mgsm"), [language],
                               data_dir=str(BENCHMARKS))
    assert notes == []
    result = filter_answers(records, contamination=index)
    hits = {d["id"]: d["benchmark"] for d in result.dropped if d["reason"] == "contaminated"}
    assert hits == CONTAMINATED[language]
    plain = {r["id"] for r in filter_answers(records).kept}
    assert {r["id"] for r in result.kept} == plain - set(hits)


def test_normalized_words():
    assert normalized_words("Janet's ducks lay 16 eggs per day!") == \
        ["janet", "s", "ducks", "lay", "16", "eggs", "per", "day"]
    assert normalized_words("ＡＢＣ  Déjà-vu,\tCOST: $1,250") == ["abc", "déjà", "vu", "cost", "1", "250"]
    assert normalized_words("राम के पास १२ आम हैं") == ["राम", "के", "पास", "12", "आम", "हैं"]
    assert normalized_words("她有3个苹果。") == ["她", "有", "3", "个", "苹", "果"]


def words(count, start=0):
    return " ".join(f"w{i}" for i in range(start, start + count))


def test_thirteen_shared_words_flag_twelve_do_not():
    index = ContaminationIndex()
    index.add("mgsm", "en", "7", words(20) + ".")
    assert index.match("en", "Intro text, " + words(13, start=5) + " and more") is not None
    assert index.match("en", "Intro text, " + words(12, start=5) + " and more") is None
    assert index.match("zh", words(20)) is None  # other languages are not compared
    hit = index.match("en", words(13, start=7).upper())
    assert (hit.benchmark, hit.item_id, hit.shared) == ("mgsm", "7", words(13, start=7))


def test_short_benchmark_questions_match_whole():
    index = ContaminationIndex()
    index.add("global_mmlu", "en", "astronomy/test/0", "Which planet is closest to the Sun?")
    assert index.match("en", "which planet is closest to the sun") is not None
    assert index.match("en", "Which planet is closest to the Sun? Explain.") is None
    assert index.questions[("global_mmlu", "en")] == 1


def test_a_language_a_benchmark_lacks_is_reported():
    _, notes = build_index(("mgsm",), ["en", "hi"], data_dir=str(BENCHMARKS))
    assert notes == ["mgsm has no hi: not checked against it"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmarks("global_mmlu,mmlu")


def test_mixed_languages_and_bad_lines_are_refused(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((FIXTURES / "answers_en.jsonl").read_text() +
                     (FIXTURES / "answers_zh.jsonl").read_text(), encoding="utf-8")
    with pytest.raises(AnswerRecordError, match="several anchor languages"):
        filter_answers(read_answer_records([mixed]))
    torn = tmp_path / "torn.jsonl"
    torn.write_text((FIXTURES / "answers_en.jsonl").read_text()[:-40], encoding="utf-8")
    with pytest.raises(AnswerRecordError, match=r"torn.jsonl:13: not valid JSON"):
        list(read_answer_records([torn]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "x", "source": "gsm8k", "language": "en"}) + "\n")
    with pytest.raises(AnswerRecordError, match="missing.jsonl:1: 'output' must be a string"):
        list(read_answer_records([missing]))


def test_command_line_tool_output_is_taken_by_shard_corpus(tmp_path, capsys):
    tool = load_tool("filter_correct")
    out = tmp_path / "anchors.jsonl"
    # The fixtures are tricky outputs on purpose: a third of them cannot be judged.
    rc = tool.main(["--input", str(FIXTURES / "answers_en.jsonl"), "--output", str(out),
                    "--decontaminate-against", "global_mmlu,belebele,mgsm",
                    "--benchmark-data-dir", str(BENCHMARKS), "--max-rejected-fraction", "0.5"])
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["kept"] == 7 and summary["dropped"]["contaminated"] == 3
    assert summary["decontamination"]["dropped_by_source"] == {"gsm8k": 1, "mmlu_prox": 2}
    assert "gsm8k: kept 4/7 (57.1%)" in captured.err and "mmlu_prox: kept 3/6 (50.0%)" in captured.err
    dropped = [json.loads(line) for line in open(tmp_path / "anchors.dropped.jsonl")]
    assert len(dropped) == 6 and {d["reason"] for d in dropped} == \
        {"contaminated", "no_boxed", "duplicate", "wrong"}

    corpus = validate_corpus([out], anchor_language="en", strict=True)
    assert corpus.summary()["kept"] == {"en": 7}

    # shard_corpus takes the output as it is (a tiny local tokenizer; no network).
    from sara_megatron.data.local_tokenizer import build_local_tokenizer

    texts = [m["content"] for line in open(out) for m in json.loads(line)["messages"]]
    build_local_tokenizer(texts, tmp_path / "tokenizer")
    (tmp_path / "corpus").mkdir()
    shutil.copy(out, tmp_path / "corpus" / "en.jsonl")
    shard = load_tool("shard_corpus")
    rc = shard.main(["--corpus", str(tmp_path / "corpus"), "--tokenizer", str(tmp_path / "tokenizer"),
                     "--output", str(tmp_path / "shards"), "--anchor-language", "en",
                     "--seq-length", "2048", "--strict"])
    assert rc == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert list(manifest["languages"]) == ["en"] and manifest["languages"]["en"]["samples"] == 7
    assert manifest["languages"]["en"]["truncated"] == 0


@pytest.mark.parametrize("args,message", [
    (["--decontaminate-against", "mmlu"], "unknown benchmark"),
    (["--benchmark-data-dir", "."], "needs --decontaminate-against"),
])
def test_command_line_errors_exit_2(tmp_path, capsys, args, message):
    tool = load_tool("filter_correct")
    with pytest.raises(SystemExit) as e:
        tool.main(["--input", str(FIXTURES / "answers_en.jsonl"),
                   "--output", str(tmp_path / "a.jsonl"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_input_data_exits_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "answers.jsonl"
    bad.write_text("{not json\n")
    rc = load_tool("filter_correct").main(["--input", str(bad), "--output", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "filter_correct: error:" in err and "answers.jsonl:1" in err
    assert "Traceback" not in err and not (tmp_path / "a.jsonl").exists()
