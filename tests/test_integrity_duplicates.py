"""Duplicate (id, lang) records: identical copies are dropped and counted; copies that differ are
all rejected and reported (a target whose anchor conflicts loses it) unless a policy keeps the
first or the last; tools/shard_corpus.py rejects them by default."""

import json

import pytest

from sara_megatron.data.corpus_format import DUPLICATE, MISSING_ANCHOR
from sara_megatron.data.corpus_validation import CorpusError, validate_corpus
from test_corpus_validation import rec


@pytest.fixture
def corpus(tmp_path):
    lines = [
        rec("a", "en"),                       # 1
        rec("b", "en", response="B one"),     # 2
        rec("a", "en"),                       # 3 identical to line 1
        rec("b", "en", response="B two"),     # 4 differs from line 2
        rec("a", "hi"),                       # 5
        rec("b", "hi"),                       # 6 its anchor conflicts
        json.dumps(json.loads(rec("a", "hi")), indent=None, separators=(",", ":")),  # 7 = 5
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _issues(result):
    return [(i.line, i.reason) for i in result.issues]


def test_identical_copies_dropped_differing_ones_all_rejected(corpus):
    result = validate_corpus([corpus], "en", duplicates="reject")
    assert {k: [r.sample_id for r in v] for k, v in result.records.items()} == \
        {"en": ["a"], "hi": ["a"]}
    assert _issues(result) == [(2, DUPLICATE), (3, DUPLICATE), (4, DUPLICATE), (6, MISSING_ANCHOR),
                               (7, DUPLICATE)]
    messages = {i.line: i.message for i in result.issues}
    assert messages[3] == f"duplicate (id, lang) = ('a', 'en'); first at {corpus}:1"
    assert messages[2] == (f"conflicting duplicate (id, lang) = ('b', 'en'): differs from the copy "
                           f"at {corpus}:4; every copy rejected (choose one with --duplicates "
                           "first|last, or fix the corpus)")
    assert messages[4].startswith("conflicting duplicate (id, lang) = ('b', 'en'): differs from "
                                  f"the copy at {corpus}:2")
    assert "its anchor record was rejected: " in messages[6] and "conflicting" in messages[6]
    assert result.summary()["rejected"][DUPLICATE] == 4
    conflict_only = corpus + ".conflict.jsonl"
    with open(conflict_only, "w", encoding="utf-8") as f:
        f.write(rec("b", "en", response="B one") + "\n" + rec("b", "en", response="B two") + "\n")
    with pytest.raises(CorpusError, match=r":2: duplicate: conflicting duplicate"):
        validate_corpus([conflict_only], "en", strict=True, duplicates="reject")


@pytest.mark.parametrize("policy, kept_line", [("first", 2), ("last", 4)])
def test_a_policy_keeps_one_copy(corpus, policy, kept_line):
    result = validate_corpus([corpus], "en", duplicates=policy)
    kept = {(r.sample_id, r.language): r.line for refs in result.records.values() for r in refs}
    assert kept == {("a", "en"): 1, ("b", "en"): kept_line, ("a", "hi"): 5, ("b", "hi"): 6}
    dropped = 6 - kept_line  # the other copy of b/en
    assert (dropped, DUPLICATE) in _issues(result)
    assert result.summary()["rejected"][DUPLICATE] == 3


def test_shard_corpus_rejects_differing_duplicates_by_default(corpus, sara_data, tmp_path):
    from test_shard_corpus import load_tool

    tool = load_tool()
    tokenizer = str(sara_data["root"] / "tokenizer")
    args = ["--corpus", corpus, "--tokenizer", tokenizer, "--seq-length", "64"]
    assert tool.main([*args, "--output", str(tmp_path / "default")]) == 0
    issues = [json.loads(line) for line in open(tmp_path / "default" / "corpus_issues.jsonl")]
    assert [(i["line"], i["reason"]) for i in issues] == [(2, DUPLICATE), (3, DUPLICATE),
                                                          (4, DUPLICATE), (6, MISSING_ANCHOR),
                                                          (7, DUPLICATE)]
    assert tool.main([*args, "--output", str(tmp_path / "last"), "--duplicates", "last"]) == 0
    manifest = json.loads((tmp_path / "last" / "manifest.json").read_text())
    assert manifest["languages"]["en"]["samples"] == 2 and manifest["languages"]["hi"]["samples"] == 2
