"""answer_anchors.py against a real OpenAI-compatible server on 127.0.0.1 that answers a known
subset correctly and injects faults; filter_correct.py on its output keeps exactly that subset.
A kill -9 mid-run and a rerun give the same answers file as an uninterrupted run."""

import collections
import importlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import launch
import pytest

from sara_megatron.chat.client import PLACEHOLDER_API_KEY
from sara_megatron.chat.server import Fault, LocalChatServer, ServerReply
from sara_megatron.construction.sources import load_anchor_samples
from sara_megatron.prompts import math_prompt, multiple_choice_prompt

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "fixtures" / "construction"
SECRET = "sk-test-a1-never-written-0123456789"

SAMPLES = load_anchor_samples("gsm8k", "en", str(DATA)) + load_anchor_samples("mmlu_prox", "en", str(DATA))
# What the fake model does with each sample; only "right" ones may survive the filter.
BEHAVIOUR = {
    "gsm8k-train-00000": "right", "gsm8k-train-00001": "wrong", "gsm8k-train-00002": "right",
    "gsm8k-train-00003": "no_box", "gsm8k-train-00004": "truncated", "gsm8k-train-00005": "right",
    "mmluprox-en-70": "right", "mmluprox-en-71": "wrong", "mmluprox-en-72": "right",
    "mmluprox-en-73": "right", "mmluprox-en-74": "truncated",
}
RIGHT = {i for i, b in BEHAVIOUR.items() if b == "right"}


def load_tool(name):
    tool = importlib.import_module(f"sara_megatron.cli.{name}")
    return tool


def sample_of(body):
    prompt = body["messages"][-1]["content"]
    found = [s for s in SAMPLES if s.question in prompt]
    assert len(found) == 1, prompt
    return found[0]


def fake_model(body):
    """Answers in a model's style; the box holds the gold answer only for the "right" samples."""
    sample = sample_of(body)
    behaviour = BEHAVIOUR[sample.id]
    if sample.options:
        letter = sample.gold if behaviour != "wrong" else "ABCDEFGHIJ"[("ABCDEFGHIJ".index(sample.gold) + 1) % len(sample.options)]
        text = f"Looking at each option, {sample.options['ABCDEFGHIJ'.index(letter)]} fits best."
        boxed = f"\\boxed{{({letter})}}"
    else:
        value = float(sample.gold) + (1 if behaviour == "wrong" else 0)
        text = f"Working step by step, the result is {value:g}."
        boxed = f"\\boxed{{{value:,g}}}"
    if behaviour == "no_box":
        return text + " So that is the answer."
    if behaviour == "truncated":
        return ServerReply(text + " Final: " + boxed + " Let me double-check the", finish_reason="length")
    return text + " Final answer: " + boxed


def run_tool(argv, capsys):
    rc = load_tool("answer_anchors").main(argv)
    out = capsys.readouterr()
    return rc, json.loads(out.out.strip().splitlines()[-1]), out.err


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_answers_then_filter_keep_exactly_the_right_subset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    faults = [Fault.rate_limit(0.05), Fault.server_error(500), Fault.drop_connection(),
              Fault.garbage_body(), Fault.no_choices()]
    answers = tmp_path / "answers.jsonl"
    with LocalChatServer(fake_model, faults=faults) as server:
        rc, summary, err = run_tool(
            ["--base-url", server.base_url, "--model", "local-moe", "--data-dir", str(DATA),
             "--temperature", "0", "--top-p", "1", "--max-tokens", "512", "--seed", "7",
             "--concurrency", "4", "--output", str(answers), "--no-progress"], capsys)
        outcomes = server.outcomes()
        bodies = [r.body for r in server.requests]
        headers = [r.headers for r in server.requests]
    assert rc == 0, err
    assert summary["answered"] == len(SAMPLES) and summary["failed"] == 0
    assert summary["retries"] == len(faults)  # each fault retried once, then answered
    assert collections.Counter(outcomes)["ok"] == len(SAMPLES)
    assert sorted(o for o in outcomes if o != "ok") == sorted(f.name for f in faults)
    assert summary["finish_reasons"] == {"stop": 9, "length": 2}
    # Every request carried the sampling settings and the paper's prompt.
    for body in bodies:
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == \
            ("local-moe", 0.0, 1.0, 512, 7)
    # OPENAI_API_KEY was in the environment; a server other than OpenAI's never saw it.
    assert all(h.get("Authorization") == f"Bearer {PLACEHOLDER_API_KEY}" for h in headers)

    records = read_jsonl(answers)
    assert [r["id"] for r in records] == [s.id for s in SAMPLES]  # a complete file is in source order
    for record, sample in zip(records, SAMPLES):
        prompt = (multiple_choice_prompt(sample.question, sample.options) if sample.options
                  else math_prompt(sample.question))
        assert record["messages"] == [{"role": "user", "content": prompt}]
        assert record["gold"] == sample.gold and record["options"] == list(sample.options)
        reply = fake_model({"messages": record["messages"]})
        assert record["output"] == (reply if isinstance(reply, str) else reply.content)
        assert record["model"] == "local-moe" and record["settings"]["seed"] == 7
    assert (tmp_path / "answers.failures.jsonl").read_text() == ""

    filt = load_tool("filter_correct")
    # The fake model cuts or leaves unboxed 3 of 11 replies on purpose: allowed here.
    assert filt.main(["--input", str(answers), "--output", str(tmp_path / "anchors.jsonl"),
                      "--max-rejected-fraction", "0.5"]) == 0
    kept = read_jsonl(tmp_path / "anchors.jsonl")
    assert {r["id"] for r in kept} == RIGHT
    dropped = {d["id"]: d["reason"] for d in read_jsonl(tmp_path / "anchors.dropped.jsonl")}
    assert dropped == {i: {"wrong": "wrong", "no_box": "no_boxed", "truncated": "truncated"}[b]
                       for i, b in BEHAVIOUR.items() if b != "right"}
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text(encoding="utf-8"), path


def test_failed_samples_are_listed_and_asked_again(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    doomed = "mmluprox-en-72"

    def failing_for_one(index, body):
        return Fault.server_error(503) if sample_of(body).id == doomed else None

    argv = ["--model", "local", "--data-dir", str(DATA), "--output", str(answers),
            "--max-retries", "1", "--no-progress"]
    with LocalChatServer(fake_model, faults=failing_for_one) as server:
        rc, summary, err = run_tool(["--base-url", server.base_url, *argv], capsys)
    assert rc == 1 and summary["failed"] == 1 and summary["answered"] == len(SAMPLES) - 1
    assert err.strip().splitlines()[-1] == (
        f"answer_anchors: 1 of {len(SAMPLES)} samples failed on their requests (commonest: "
        f"server_error, 1); they are listed in {tmp_path / 'answers.failures.jsonl'} and not in "
        "the answers file; rerun the same command to ask for them again (the answers received "
        "stay)")
    assert [f["id"] for f in read_jsonl(tmp_path / "answers.failures.jsonl")] == [doomed]
    assert doomed not in {r["id"] for r in read_jsonl(answers)}

    with LocalChatServer(fake_model) as server:
        rc, summary, _ = run_tool(["--base-url", server.base_url, *argv], capsys)
        asked = [sample_of(r.body).id for r in server.requests]
    assert rc == 0 and asked == [doomed]  # only the failed one is asked again
    assert summary["already_done"] == len(SAMPLES) - 1 and summary["answered"] == 1
    assert [r["id"] for r in read_jsonl(answers)] == [s.id for s in SAMPLES]
    assert (tmp_path / "answers.failures.jsonl").read_text() == ""


def test_a_torn_last_line_is_cut_and_other_settings_are_refused(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    argv = ["--model", "local", "--data-dir", str(DATA), "--output", str(answers),
            "--sources", "gsm8k", "--limit", "3", "--no-progress"]
    with LocalChatServer(fake_model) as server:
        assert run_tool(["--base-url", server.base_url, *argv], capsys)[0] == 0
        lines = answers.read_text(encoding="utf-8").splitlines(keepends=True)
        answers.write_text(lines[0] + lines[1][:25], encoding="utf-8")  # killed mid-write
        rc, summary, _ = run_tool(["--base-url", server.base_url, *argv], capsys)
    assert rc == 0 and summary["already_done"] == 1 and summary["answered"] == 2
    assert answers.read_text(encoding="utf-8").splitlines(keepends=True) == lines

    with LocalChatServer(fake_model) as server:
        rc = load_tool("answer_anchors").main(["--base-url", server.base_url, *argv,
                                               "--temperature", "0.7"])
        assert server.requests == []
    err = capsys.readouterr().err
    assert rc == 2 and "answer_anchors: error:" in err and "other settings" in err


@pytest.mark.parametrize("extra,message", [
    (["--model", "gpt-5-mini", "--temperature", "0.5"], "reasoning model"),
    (["--sources", "gsm8k,math"], "unknown source"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--template-language", "hi"], "needs --templates"),
    (["--extra-body", "[1]"], "must be a JSON object"),
])
def test_bad_flags_exit_2(tmp_path, capsys, extra, message):
    argv = ["--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--data-dir", str(DATA),
            "--output", str(tmp_path / "a.jsonl"), *extra]
    with pytest.raises(SystemExit) as e:
        load_tool("answer_anchors").main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.multiprocess
def test_kill_minus_9_and_rerun_gives_the_uninterrupted_file(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("OPENAI_API_KEY", None)

    def command(base_url, output):
        return [*launch.tool("answer_anchors"), "--base-url", base_url,
                "--model", "local", "--data-dir", str(DATA), "--concurrency", "2",
                "--output", str(output), "--no-progress"]

    reference = tmp_path / "reference.jsonl"
    with LocalChatServer(fake_model) as server:
        subprocess.run(command(server.base_url, reference), env=env, check=True,
                       capture_output=True, timeout=120)

    killed = tmp_path / "killed.jsonl"
    with LocalChatServer(fake_model, latency_s=0.15) as server:
        proc = subprocess.Popen(command(server.base_url, killed), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if killed.exists() and killed.read_text(encoding="utf-8").count("\n") >= 4:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written_at_kill = killed.read_text(encoding="utf-8").count("\n")
        assert 4 <= written_at_kill < len(SAMPLES)
        subprocess.run(command(server.base_url, killed), env=env, check=True,
                       capture_output=True, timeout=120)
        answered = collections.Counter(sample_of(r.body).id for r in server.requests
                                       if r.outcome == "ok")
    assert killed.read_bytes() == reference.read_bytes()
    # Asked twice only what was in flight at the kill (at most --concurrency requests).
    repeated = [i for i, n in answered.items() if n > 1]
    assert len(repeated) <= 2 and all(n <= 2 for n in answered.values())
    assert set(answered) == {s.id for s in SAMPLES}


def test_chinese_track_with_translated_templates(tmp_path, capsys):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"templates": {"zh": {
        "math": "请解答下面的问题。\n\n问题：\n{question}\n\n最后把答案写在 \\boxed{} 中。",
        "multiple_choice": "下面是一道单选题。\n\n问题：\n{question}\n\n选项：\n{options}\n\n"
                           "最后把正确选项写在 \\boxed{} 中。",
    }}}, ensure_ascii=False), encoding="utf-8")
    answers = tmp_path / "answers_zh.jsonl"
    with LocalChatServer(lambda body: "\\boxed{8}") as server:
        rc, summary, _ = run_tool(
            ["--base-url", server.base_url, "--model", "local", "--data-dir", str(DATA),
             "--language", "zh", "--limit", "2", "--template-language", "zh",
             "--templates", str(templates), "--output", str(answers), "--no-progress",
             "--extra-body", '{"chat_template_kwargs": {"enable_thinking": false}}'], capsys)
        prompts = [r.body["messages"][0]["content"] for r in server.requests]
        assert all(r.body["chat_template_kwargs"] == {"enable_thinking": False}
                   for r in server.requests)
    assert rc == 0 and summary["answered"] == 4
    records = read_jsonl(answers)
    assert [r["id"] for r in records] == ["gsm8k-train-00000", "gsm8k-train-00001",
                                          "mmluprox-zh-70", "mmluprox-zh-71"]
    assert all(r["language"] == "zh" for r in records)
    assert sorted(prompts) == sorted(r["messages"][0]["content"] for r in records)
    assert records[0]["messages"][0]["content"].startswith("请解答下面的问题。")
    assert "A) 伏特" in records[2]["messages"][0]["content"]
    kept = tmp_path / "anchors_zh.jsonl"
    assert load_tool("filter_correct").main(["--input", str(answers), "--output", str(kept)]) == 0
    assert [r["id"] for r in read_jsonl(kept)] == ["gsm8k-train-00001"]  # only its gold is 8
