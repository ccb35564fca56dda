"""A resume knows what it resumes: the model (its files' hashes, or the served name and revision)
and every benchmark file it read (their content hashes). Another model in a folder of the same
name, or a benchmark file corrected in place, is refused in one line, exit 2; --restart starts
the folder over."""

import importlib
import json
import shutil
from pathlib import Path

import pytest

from sara_megatron.chat.server import LocalChatServer
from sara_megatron.evaluation.benchmarks import load_benchmark_source, rows_fingerprint
from sara_megatron.evaluation.model_identity import hf_model_fingerprint
from sara_megatron.evaluation.records import read_item_records, read_results

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"


def evaluate_tool():
    module = importlib.import_module("sara_megatron.cli.evaluate")
    return module


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    """runs/sara/export and runs/fft/export: one base name, different weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.demo import write_tiny_hf_model

    root = tmp_path_factory.mktemp("two_exports")
    texts = [line for path in sorted(FIXTURES.rglob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    build_local_tokenizer(texts, root / "tokenizer", vocab_size=256)
    sara = root / "runs" / "sara" / "export"
    write_tiny_hf_model(sara, root / "tokenizer")
    fft = root / "runs" / "fft" / "export"
    shutil.copytree(sara, fft)
    weights = load_file(fft / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.full_like(weights[name], 0.01)
    save_file(weights, fft / "model.safetensors", metadata={"format": "pt"})
    return sara, fft


def hf_args(model_dir, output, *extra):
    return ["--backend", "hf", "--model-dir", str(model_dir), "--data-dir", str(FIXTURES),
            "--benchmarks", "mgsm", "--languages", "en", "--runs", "1", "--limit", "2",
            "--max-new-tokens", "2", "--dtype", "float32", "--device", "cpu",
            "--output", str(output), "--no-progress", *extra]


def test_hf_resume_refuses_another_models_weights_under_the_same_folder_name(two_exports,
                                                                             tmp_path, capsys):
    sara, fft = two_exports
    out = tmp_path / "out"
    assert evaluate_tool().main(hf_args(sara, out)) == 0
    recorded = read_results(out)["settings"]["model_fingerprint"]
    assert recorded == hf_model_fingerprint(str(sara))
    assert set(recorded["files"]) >= {"model.safetensors", "config.json", "tokenizer.json",
                                      "generation_config.json"}
    capsys.readouterr()
    before = (out / "items.jsonl").read_bytes()

    assert evaluate_tool().main(hf_args(fft, out)) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"evaluate: error: {out} holds answers of another model "
                           "(model.safetensors sha256 ")
    assert line.endswith("; use a new --output, or --restart (which discards the folder's "
                         "answers)")
    assert (out / "items.jsonl").read_bytes() == before  # nothing asked, nothing written

    # The same model resumes (nothing to ask); --restart takes the folder over.
    assert evaluate_tool().main(hf_args(sara, out)) == 0
    assert (out / "items.jsonl").read_bytes() == before
    assert evaluate_tool().main(hf_args(fft, out, "--restart")) == 0
    assert read_results(out)["settings"]["model_fingerprint"] == hf_model_fingerprint(str(fft))
    assert len(read_item_records(out / "items.jsonl")) == 2


def openai_args(server, output, data_dir=FIXTURES, *extra, languages="en,sw"):
    return ["--backend", "openai", "--base-url", server.base_url, "--model", "sara",
            "--data-dir", str(data_dir), "--benchmarks", "mgsm", "--languages", languages,
            "--runs", "1", "--output", str(output), "--no-progress", *extra]


def test_openai_resume_refuses_another_model_revision(tmp_path, capsys):
    out = tmp_path / "out"
    with LocalChatServer(lambda body: "\\boxed{8}") as server:
        tool = evaluate_tool()
        assert tool.main(openai_args(server, out, FIXTURES, "--model-revision", "runs/sara@500")) == 0
        asked = len(server.requests)
        assert read_results(out)["settings"]["model_fingerprint"] == {
            "backend": "openai", "model": "sara", "revision": "runs/sara@500"}
        capsys.readouterr()
        assert tool.main(openai_args(server, out, FIXTURES,
                                     "--model-revision", "runs/fft@500")) == 2
        assert len(server.requests) == asked
    [line] = error_lines(capsys)
    assert line == (f"evaluate: error: {out} holds answers of another model (revision "
                    "'runs/sara@500' -> 'runs/fft@500'); use a new --output, or --restart "
                    "(which discards the folder's answers)")


def test_resume_refuses_a_benchmark_file_corrected_in_place(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    out = tmp_path / "out"
    with LocalChatServer(lambda body: "\\boxed{8}") as server:
        tool = evaluate_tool()
        assert tool.main(openai_args(server, out, data)) == 0
        asked = len(server.requests)
        capsys.readouterr()
        en = data / "mgsm" / "en.jsonl"
        rows = [json.loads(line) for line in en.read_text(encoding="utf-8").splitlines()]
        rows[0]["answer_number"] = 9  # the gold answer corrected in place
        en.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

        assert tool.main(openai_args(server, out, data)) == 2
        [line] = error_lines(capsys)
        assert line.startswith(f"evaluate: error: {out} was scored on other benchmark data "
                               f"(mgsm/en ({en}): sha256:")
        assert line.endswith("; use a new --output, or --restart (which discards the folder's "
                             "answers)")
        # A run that reads only sw resumes; the en fingerprint is kept for a later run.
        assert tool.main(openai_args(server, out, data, languages="sw")) == 0
        capsys.readouterr()
        assert tool.main(openai_args(server, out, data)) == 2
        assert "mgsm/en" in error_lines(capsys)[0]
        assert len(server.requests) == asked

        assert tool.main(openai_args(server, out, data, "--restart")) == 0
        assert len(server.requests) == 2 * asked
    golds = {r["item_id"]: r["gold"] for r in read_item_records(out / "items.jsonl")
             if r["language"] == "en"}
    assert golds["0"] == "9"


def test_hub_rows_fingerprint_covers_every_row(monkeypatch):
    from sara_megatron.evaluation import benchmarks

    rows = [json.loads(line) for line in
            (FIXTURES / "mgsm" / "en.jsonl").read_text(encoding="utf-8").splitlines()]
    monkeypatch.setattr(benchmarks, "_hub_rows", lambda name, language: list(rows))
    first = load_benchmark_source("mgsm", "en", limit=1)
    assert len(first.items) == 1 and first.source == "juletxara/mgsm (en)"
    assert first.fingerprint == rows_fingerprint(rows)
    rows[-1] = {**rows[-1], "answer_number": rows[-1]["answer_number"] + 1}  # past the limit
    assert load_benchmark_source("mgsm", "en", limit=1).fingerprint != first.fingerprint
