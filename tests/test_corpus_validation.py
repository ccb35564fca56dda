"""Parallel corpus validation: every kind of bad record, reported by file and line, and counted."""

import dataclasses
import json
import os

import pytest

from sara_megatron.data.corpus_format import (
    DUPLICATE,
    EMPTY_TEXT,
    INVALID_JSON,
    INVALID_RECORD,
    MISSING_ANCHOR,
    UNKNOWN_LANGUAGE,
)
from sara_megatron.data.corpus_validation import CorpusError, validate_corpus
from sara_megatron.data.languages import known_languages


def rec(sample_id, lang, prompt="What is 2+2?", response="It is \\boxed{4}.", **extra):
    obj = {"id": sample_id, "lang": lang, "source": "gsm8k", "answer": "4",
           "messages": [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": response}]}
    obj.update(extra)
    return json.dumps(obj, ensure_ascii=False)


# (line text, reason or None for a kept record); line numbers are 1-based positions in this list.
ANCHOR_LINES = [
    (rec("s1", "en"), None),
    (rec("s2", "en"), None),
    (rec("s3", "en", response="   "), EMPTY_TEXT),  # its targets lose their anchor
    ("", None),  # blank: ignored, counted as blank
    ("{not json", INVALID_JSON),
    (json.dumps({"id": "s4", "lang": "en", "messages": []}), INVALID_RECORD),  # no source
    (rec("s5", "en", messages=[{"role": "assistant", "content": "hi"}]), INVALID_RECORD),
    (rec("s1", "en"), DUPLICATE),
    (rec("s2", "xx"), UNKNOWN_LANGUAGE),
    (rec("s7", "en", answer=None, system=1), None),  # no gold answer; extra fields ignored
]
TARGET_LINES = [
    (rec("s1", "hi", "२ और २ कितने हैं?", "यह \\boxed{4} है।"), None),
    (rec("s2", "sw"), None),
    (rec("s3", "hi"), MISSING_ANCHOR),  # anchor rejected for empty text
    (rec("s9", "hi"), MISSING_ANCHOR),  # no anchor at all
    (rec("s1", "hi"), DUPLICATE),
    (rec("s2", "hi", prompt=""), EMPTY_TEXT),
]


@pytest.fixture
def corpus(tmp_path):
    paths = []
    for name, lines in (("en.jsonl", ANCHOR_LINES), ("targets.jsonl", TARGET_LINES)):
        path = tmp_path / name
        path.write_text("".join(text + "\n" for text, _ in lines), encoding="utf-8")
        paths.append(str(path))
    return paths


def expected_issues(paths):
    out = []
    for path, lines in zip(paths, (ANCHOR_LINES, TARGET_LINES)):
        out += [(path, i, reason) for i, (_, reason) in enumerate(lines, 1) if reason]
    return out


def test_each_bad_record_is_reported_by_file_and_line(corpus):
    result = validate_corpus(corpus, "en")
    assert [(i.path, i.line, i.reason) for i in result.issues] == expected_issues(corpus)
    kept = {lang: [r.sample_id for r in refs] for lang, refs in result.records.items()}
    assert kept == {"en": ["s1", "s2", "s7"], "hi": ["s1"], "sw": ["s2"]}
    duplicates = [i.message for i in result.issues if i.reason == DUPLICATE]
    assert duplicates == [f"duplicate (id, lang) = ('s1', 'en'); first at {corpus[0]}:1",
                          f"duplicate (id, lang) = ('s1', 'hi'); first at {corpus[1]}:1"]
    anchorless = [i for i in result.issues if i.reason == MISSING_ANCHOR]
    assert "anchor record was rejected" in anchorless[0].message
    assert "empty_text" in anchorless[0].message
    assert "rejected" not in anchorless[1].message
    assert str(anchorless[1]).startswith(f"{corpus[1]}:4: missing_anchor:")


def test_no_record_dropped_without_being_counted(corpus):
    summary = validate_corpus(corpus, "en").summary()
    lines = len(ANCHOR_LINES) + len(TARGET_LINES)
    assert summary["lines"] == lines and summary["blank_lines"] == 1
    assert summary["records_read"] == summary["kept_total"] + summary["rejected_total"] == lines - 1
    assert summary["rejected"] == {INVALID_JSON: 1, INVALID_RECORD: 2, UNKNOWN_LANGUAGE: 1,
                                   EMPTY_TEXT: 2, DUPLICATE: 2, MISSING_ANCHOR: 2}


def test_strict_fails_on_the_first_bad_record(corpus):
    with pytest.raises(CorpusError, match=rf"^{corpus[0]}:3: empty_text: messages\[1\]"):
        validate_corpus(corpus, "en", strict=True)
    clean = corpus[0] + ".clean"
    with open(clean, "w", encoding="utf-8") as f:
        f.write(rec("a", "en") + "\n" + rec("b", "hi") + "\n")
    with pytest.raises(CorpusError, match=r":2: missing_anchor: no valid 'en' anchor record"):
        validate_corpus([clean], "en", strict=True)


def test_extra_languages_and_records_read_back(corpus):
    result = validate_corpus(corpus, "en", known_languages(["xx"]))
    assert [r.sample_id for r in result.records["xx"]] == ["s2"]
    ref = result.records["hi"][0]
    record = ref.read(result.known_languages)
    assert (ref.line, record.prompt_messages[0].content) == (1, "२ और २ कितने हैं?")
    assert record.response.content == "यह \\boxed{4} है।" and record.answer == "4"
    assert validate_corpus(corpus, "en").records["en"][2].read(known_languages()).answer is None
    with pytest.raises(ValueError, match="not language codes"):
        known_languages(["Hindi!"])


def test_directory_input_and_anchor_choice(corpus, tmp_path):
    result = validate_corpus([tmp_path], "en")
    assert [f.path for f in result.files] == sorted(corpus)
    with pytest.raises(ValueError, match="anchor language 'klingon'"):
        validate_corpus(corpus, "klingon")
    # The paper's -q-sw-s ablation anchors on Swahili: only s2 has a sw anchor.
    sw = validate_corpus(corpus, "sw")
    assert [r.sample_id for r in sw.records["sw"]] == ["s2"] and "hi" not in sw.records


def escaped(line):
    """The record with its non-ASCII text as JSON \\u escapes: the way a lone surrogate (valid
    JSON, not valid text) gets into a UTF-8 file."""
    return json.dumps(json.loads(line))


# "\ud83d" is the first half of an emoji's surrogate pair, as a truncated translation leaves it.
LONE_SURROGATE_LINES = [
    (escaped(rec("s1", "hi", prompt="\ud83d cut")), "messages[0].content"),
    (escaped(rec("s2", "hi", response="ok \ud83d")), "messages[1].content"),
    (escaped(rec("s1", "sw", answer="4\udc00")), "'answer'"),
    (escaped(rec("s\ud800", "sw")), "'id'"),
]


def test_lone_surrogate_text_is_an_invalid_record(corpus, tmp_path):
    path = tmp_path / "surrogates.jsonl"
    path.write_text("".join(text + "\n" for text, _ in LONE_SURROGATE_LINES), encoding="utf-8")
    result = validate_corpus([corpus[0], str(path)], "en")
    issues = [i for i in result.issues if i.path == str(path)]
    assert [(i.line, i.reason) for i in issues] == [(1, INVALID_RECORD), (2, INVALID_RECORD),
                                                    (3, INVALID_RECORD), (4, INVALID_RECORD)]
    for issue, (_, field) in zip(issues, LONE_SURROGATE_LINES):
        assert f"{field} holds a lone UTF-16 surrogate" in issue.message
        # As shard_corpus writes it to corpus_issues.jsonl: the report itself is valid text.
        json.dumps(dataclasses.asdict(issue), ensure_ascii=False).encode("utf-8")
    assert issues[-1].sample_id is None  # the id with the surrogate is not carried along
    assert result.summary()["rejected"][INVALID_RECORD] == 2 + 4
    assert "sw" not in result.records and "hi" not in result.records
    with pytest.raises(CorpusError, match=rf"^{path}:1: invalid_record: messages\[0\]\.content"):
        validate_corpus([str(path)], "hi", strict=True)


def test_a_corpus_folder_leaves_out_the_translation_failures_file(tmp_path):
    """tools/translate_corpus.py writes translation_failures.jsonl beside the language files;
    a folder given as the corpus must not read its lines as (invalid) records."""
    from sara_megatron.data.corpus_validation import expand_corpus_paths

    for name in ("en.jsonl", "hi.jsonl", "translation_failures.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert [os.path.basename(p) for p in expand_corpus_paths([tmp_path])] == ["en.jsonl", "hi.jsonl"]
    # Named explicitly, a file is read as given.
    failures = tmp_path / "translation_failures.jsonl"
    assert expand_corpus_paths([failures]) == [str(failures)]
