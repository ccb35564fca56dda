"""Corpus -> token shards: chat-template tokenization, truncation counts, identical output for any
worker count, resume after an interrupted run, Megatron indexed datasets readable as such."""

import importlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from sara_megatron.data.chat_tokenization import load_tokenizer, tokenize_record
from sara_megatron.data.corpus_format import ChatMessage, ParallelRecord
from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
from sara_megatron.data.local_tokenizer import build_local_tokenizer
from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
from sara_megatron.data.token_shards import TokenShards

REPO = Path(__file__).resolve().parents[1]
SEQ = 48  # short enough that some synthetic samples are truncated


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_inputs")
    paths = write_synthetic_corpus(root / "corpus", num_samples=24, languages=("en", "hi", "sw"))
    with open(paths[1], "a", encoding="utf-8") as f:  # one bad record, skipped and counted
        f.write('{"id": "orphan", "lang": "hi", "source": "x", "messages": '
                '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    build_local_tokenizer(corpus_texts(paths[:1]), root / "tokenizer")
    return root


def config(inputs, out, **overrides):
    settings = dict(corpus_paths=(str(inputs / "corpus"),), output_dir=str(out),
                    tokenizer=str(inputs / "tokenizer"), seq_length=SEQ, shard_size=5)
    settings.update(overrides)
    return ShardingConfig(**settings)


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards_ref")
    report = shard_corpus(config(inputs, out))
    return out, report


def test_tokens_follow_the_chat_template(inputs, reference):
    out, _ = reference
    tok = load_tokenizer(inputs / "tokenizer")
    shards = TokenShards(out, verify=True)
    assert shards.languages == ["en", "hi", "sw"] and shards.anchor_language == "en"
    records = {}
    for lang in shards.languages:
        with open(inputs / "corpus" / f"{lang}.jsonl", encoding="utf-8") as f:
            records[lang] = [json.loads(line) for line in f][:24]
    for lang in shards.languages:
        samples = shards.samples(lang)
        assert [s.meta.sample_id for s in samples] == [r["id"] for r in records[lang]]
        for sample, rec in zip(samples, records[lang]):
            msgs = rec["messages"]
            full = tok(tok.apply_chat_template(msgs, tokenize=False),
                       add_special_tokens=False)["input_ids"]
            prompt = tok(tok.apply_chat_template(msgs[:1], tokenize=False,
                                                 add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            assert full[:len(prompt)] == prompt
            tokens = shards.tokens(sample)
            assert tokens.tolist() == full[:SEQ]
            meta = sample.meta
            assert (meta.language, meta.source) == (lang, "synthetic")
            assert meta.prompt_length == min(len(prompt), SEQ)
            assert meta.token_count == len(tokens) and meta.truncated == (len(full) > SEQ)


def test_counts_in_manifest(reference):
    out, report = reference
    manifest = json.loads((out / "manifest.json").read_text())
    shards = TokenShards(out)
    for lang, info in manifest["languages"].items():
        samples = shards.samples(lang)
        assert info["samples"] == len(samples) == 24
        assert info["truncated"] == sum(s.meta.truncated for s in samples) > 0
        assert info["tokens"] == sum(s.meta.token_count for s in samples)
        assert len(info["shards"]) == 5  # 24 samples, 5 per shard
    assert manifest["validation"]["rejected"]["missing_anchor"] == 1
    issues = (out / "corpus_issues.jsonl").read_text().splitlines()
    assert len(issues) == 1 and json.loads(issues[0])["sample_id"] == "orphan"
    assert report.shards_written == 15 and report.shards_resumed == 0


def test_shards_are_megatron_indexed_datasets(reference):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, _ = reference
    ds = IndexedDataset(str(out / "hi" / "hi-00001"))
    assert len(ds) == 5 and ds.index.dtype == np.uint16  # vocabulary of 200 ids
    assert ds.document_indices.tolist() == list(range(6))  # one document per sample
    assert ds[0].tolist() == TokenShards(out).tokens(TokenShards(out).samples("hi")[5]).tolist()


def test_output_identical_for_any_worker_count(inputs, reference, tmp_path):
    out, _ = reference
    shard_corpus(config(inputs, tmp_path / "w2", workers=2))
    assert tree(tmp_path / "w2") == tree(out)


class Killed(Exception):
    pass


def test_interrupted_run_resumes(inputs, reference, tmp_path):
    out = tmp_path / "resumed"

    def kill_after_four(progress):
        if progress.shards_done == 4:
            raise Killed

    with pytest.raises(Killed):
        shard_corpus(config(inputs, out), progress=kill_after_four)
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TokenShards(out)
    done = sorted(out.rglob("*.done.json"))
    assert len(done) == 4
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("en-0000[0-2].*")}
    # A kill in the middle of a shard leaves temporary files and, after a rename, files without
    # a marker; a shard whose file changed after its marker was written is redone as well.
    (out / "en" / "en-00004.bin.partial").write_bytes(b"torn")
    with open(out / "en" / "en-00003.bin", "ab") as f:
        f.write(b"\0")
    report = shard_corpus(config(inputs, out))
    assert (report.shards_resumed, report.shards_written) == (3, 12)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards untouched
    assert tree(out) == tree(reference[0])
    # Nothing left to do on a third run.
    assert shard_corpus(config(inputs, out)).shards_written == 0


def test_rerun_with_other_settings_is_refused(inputs, reference, tmp_path):
    out = tmp_path / "x"
    shard_corpus(config(inputs, out, shard_size=100))
    with pytest.raises(ValueError, match=r"other inputs or settings \(differs in: seq_length\)"):
        shard_corpus(config(inputs, out, shard_size=100, seq_length=SEQ + 1))


def test_strict_run_stops_at_the_bad_record(inputs, tmp_path):
    from sara_megatron.data.corpus_validation import CorpusError

    with pytest.raises(CorpusError, match=r"hi.jsonl:25: missing_anchor"):
        shard_corpus(config(inputs, tmp_path / "strict", strict=True))
    assert not (tmp_path / "strict").exists()


def test_a_language_with_no_record_left_is_refused(inputs, tmp_path, capsys):
    """A target language whose every record lost its anchor (files of another corpus beside
    this one's) is not dropped without a word: one line naming it and why, exit 2, no output."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("en.jsonl", "hi.jsonl"):
        (corpus / name).write_text((inputs / "corpus" / name).read_text())
    orphans = [line.replace('"id": "', '"id": "other-') for line in
               (inputs / "corpus" / "sw.jsonl").read_text().splitlines() if line.strip()]
    (corpus / "sw.jsonl").write_text("\n".join(orphans) + "\n")
    rc = load_tool().main(["--corpus", str(corpus), "--tokenizer", str(inputs / "tokenizer"),
                           "--output", str(tmp_path / "out"), "--seq-length", str(SEQ)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("shard_corpus.py: error: no record of sw (missing_anchor 24) is left "
                             "after validation (anchor language 'en'); the first: "), err[0]
    assert not (tmp_path / "out").exists()


def load_tool():
    tool = importlib.import_module("sara_megatron.cli.shard_corpus")
    return tool


def test_command_line_tool(inputs, reference, tmp_path, capsys):
    tool = load_tool()
    out = tmp_path / "cli"
    rc = tool.main(["--corpus", str(inputs / "corpus"), "--tokenizer", str(inputs / "tokenizer"),
                    "--output", str(out), "--seq-length", str(SEQ), "--shard-size", "5"])
    assert rc == 0 and tree(out) == tree(reference[0])
    captured = capsys.readouterr()
    assert "rejected missing_anchor: 1" in captured.out and "15 shard(s)" in captured.out
    assert "shard_corpus: 15/15 shards" in captured.err
    rc = tool.main(["--corpus", str(inputs / "corpus"), "--tokenizer", str(inputs / "tokenizer"),
                    "--output", str(out), "--strict"])
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert rc == 2 and line.startswith("shard_corpus.py: error: ") and "(strict: " in line
    assert os.path.exists(out / "manifest.json")
    # Another setting into the same folder: one line and exit 2, not a traceback.
    rc = tool.main(["--corpus", str(inputs / "corpus"), "--tokenizer", str(inputs / "tokenizer"),
                    "--output", str(out), "--seq-length", str(SEQ + 1), "--shard-size", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"shard_corpus.py: error: {out} holds shards made from other "
                               "inputs or settings (differs in: seq_length); write to a new "
                               "output directory or delete this one\n")


@pytest.mark.parametrize("seq_length", [0, -3])
def test_non_positive_seq_length_is_refused(inputs, tmp_path, capsys, seq_length):
    # Refused before anything is written: -3 would otherwise cut three tokens off every sample.
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=rf"seq_length must be a positive number of tokens, "
                                         rf"got {seq_length}"):
        shard_corpus(config(inputs, out, seq_length=seq_length))
    assert not out.exists()
    record = ParallelRecord("a", "en", (ChatMessage("user", "q"), ChatMessage("assistant", "a")),
                            "x")
    with pytest.raises(ValueError, match="seq_length must be a positive"):
        tokenize_record(load_tokenizer(inputs / "tokenizer"), record, seq_length)
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(["--corpus", str(inputs / "corpus"), "--tokenizer",
                          str(inputs / "tokenizer"), "--output", str(out),
                          "--seq-length", str(seq_length)])
    assert exit_info.value.code == 2 and not out.exists()
    assert "--seq-length: seq_length must be a positive" in capsys.readouterr().err


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name, message", [
    ("no_such_tokenizer", "no hub copy of that name in the local HF cache"),
    ("some-org/some-model", "no hub copy of that name in the local HF cache"),
    ("./models/missing", "no such folder"),
    ("/models/missing", "no such folder"),
])
def test_a_missing_tokenizer_is_named_without_a_download(inputs, tmp_path, capsys, monkeypatch,
                                                         name, message):
    # A mistyped local path must not become a hub download (49 s, then a connection error).
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty HF cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match=message):
        load_tokenizer(name)
    out = tmp_path / "out"
    rc = load_tool().main(["--corpus", str(inputs / "corpus"), "--tokenizer", name,
                           "--output", str(out)])
    assert rc == 2 and message in capsys.readouterr().err
    load_tokenizer(inputs / "tokenizer")  # a folder still loads with the network refused


@pytest.mark.parametrize("args, message", [
    (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--corpus", "missing.jsonl"], "--corpus: no such file or folder: missing.jsonl"),
])
def test_bad_arguments_are_refused_before_any_work(inputs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = {"--corpus": str(inputs / "corpus"), "--tokenizer": str(inputs / "tokenizer"),
            "--output": str(out)}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main([item for pair in base.items() for item in pair])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
