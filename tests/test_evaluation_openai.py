"""The runner over a real OpenAI-compatible HTTP server on 127.0.0.1 that knows the right answers
to a chosen subset of items, and injects 429 / 5xx / dropped connections / bad bodies."""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import launch
import pytest

from sara_megatron.chat.server import Fault, LocalChatServer
from sara_megatron.evaluation.backends import OpenAIBackend, SamplingSettings
from sara_megatron.evaluation.benchmarks import BENCHMARK_LANGUAGES, load_benchmark
from sara_megatron.evaluation.records import read_item_records, read_results
from sara_megatron.evaluation.runner import (
    EvaluationIncomplete, EvaluationPlan, EvaluationRunner, item_seed,
)
from sara_megatron.evaluation.tasks import item_messages
from sara_megatron.prompts import OPTION_LETTERS

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
LANGUAGES = ("hi", "sw", "en")
BENCHMARKS = ("global_mmlu", "belebele", "mgsm")
RUNS = 2


class Oracle:
    """Maps a request (prompt + seed) back to its (item, run) and answers the chosen subset right:
    the subset differs per run, so runs differ and the std is not trivially 0."""

    def __init__(self, benchmarks=BENCHMARKS, languages=LANGUAGES, runs=RUNS, seed=0):
        self.by_request = {}
        for name in benchmarks:
            for lang in languages:
                if lang not in BENCHMARK_LANGUAGES[name]:
                    continue
                for item in load_benchmark(name, lang, data_dir=FIXTURES):
                    prompt = item_messages(item)[0]["content"]
                    for run in range(1, runs + 1):
                        self.by_request[(prompt, item_seed(seed, run, item))] = (item, run)

    @staticmethod
    def knows(item, run) -> bool:
        digest = hashlib.sha256(f"{item.language}/{item.item_id}/{run}".encode()).digest()
        return digest[0] % 3 != 0

    def identify(self, body):
        return self.by_request[(body["messages"][0]["content"], body["seed"])]

    def __call__(self, body) -> str:
        item, run = self.identify(body)
        if item.options:
            answer = item.gold if self.knows(item, run) else \
                OPTION_LETTERS[(OPTION_LETTERS.index(item.gold) + 1) % len(item.options)]
            return f"Reasoning in {item.language}... so the answer is \\boxed{{{answer}}}."
        number = int(item.gold) + (0 if self.knows(item, run) else 1)
        return f"Step by step: ... \\boxed{{{number}}}"

    def expected(self, name, lang):
        items = load_benchmark(name, lang, data_dir=FIXTURES)
        return [100.0 * sum(self.knows(i, run) for i in items) / len(items)
                for run in range(1, RUNS + 1)]


def plan(**kw):
    defaults = dict(benchmarks=BENCHMARKS, languages=LANGUAGES, runs=RUNS, data_dir=str(FIXTURES))
    return EvaluationPlan(**{**defaults, **kw})


def run_evaluation(server, output, concurrency=8, **plan_kw):
    backend = OpenAIBackend(server.base_url, "sara", SamplingSettings(), concurrency=concurrency,
                            max_retries=4, backoff_base_s=0.01, timeout_s=30)
    runner = EvaluationRunner(backend, plan(**plan_kw), str(output), {"model": "sara"},
                              progress=False, say=lambda _: None)
    return asyncio.run(runner.run())


def total_items():
    return sum(len(load_benchmark(b, lang, data_dir=FIXTURES)) * RUNS
               for b in BENCHMARKS for lang in LANGUAGES if lang in BENCHMARK_LANGUAGES[b])


def check_complete(output, oracle):
    results = read_results(output)
    assert results["complete"] is True
    for name in BENCHMARKS:
        expected_languages = [lang for lang in LANGUAGES if lang in BENCHMARK_LANGUAGES[name]]
        assert sorted(results["benchmarks"][name]) == sorted(expected_languages)
        for lang in expected_languages:
            entry = results["benchmarks"][name][lang]
            assert entry["runs"] == oracle.expected(name, lang)
            assert entry["n"] == 3
    records = read_item_records(Path(output) / "items.jsonl")
    keys = [(r["benchmark"], r["language"], r["run"], r["item_id"]) for r in records]
    assert len(keys) == len(set(keys)) == total_items()  # none lost, none twice
    return results, records


def test_accuracy_exact_under_faults_and_requests_carry_the_protocol(tmp_path):
    oracle = Oracle()
    faults = {2: Fault.rate_limit(0.05), 5: Fault.server_error(500), 9: Fault.drop_connection(),
              13: Fault.garbage_body(), 17: Fault.no_choices(), 21: Fault.server_error(503),
              22: Fault.rate_limit(0.02)}
    with LocalChatServer(oracle, faults=lambda i, body: faults.get(i)) as server:
        run_evaluation(server, tmp_path / "out")
        requests = list(server.requests)
    check_complete(tmp_path / "out", oracle)
    assert {r.outcome for r in requests} >= {"ok", "rate_limit", "server_error",
                                             "drop_connection", "garbage_body", "no_choices"}
    ok = [r for r in requests if r.outcome == "ok"]
    assert len(ok) == total_items()  # every item answered exactly once
    answered = {(r.body["messages"][0]["content"], r.body["seed"]) for r in ok}
    assert len(answered) == total_items()
    for r in requests:
        item, _ = oracle.identify(r.body)
        assert r.body["messages"] == item_messages(item)  # the paper's template, in one user turn
        assert "\\boxed{}" in r.body["messages"][0]["content"]
        assert r.body["temperature"] == 0.1 and r.body["top_p"] == 1.0
        assert r.body["max_tokens"] == 2048 and r.body["model"] == "sara"
    table = (tmp_path / "out" / "table.md").read_text(encoding="utf-8")
    assert table.splitlines()[0] == "| Benchmark | Model | hi | sw | en | Avg. |"
    assert "| MGSM | sara | – |" in table and "ddof 1" in table


def test_a_failed_request_is_not_scored_and_a_rerun_finishes(tmp_path):
    oracle = Oracle()
    items = load_benchmark("mgsm", "sw", data_dir=FIXTURES)
    doomed = item_messages(items[1])[0]["content"]

    def faults(index, body):  # one item's every attempt fails
        return Fault.server_error(500) if body["messages"][0]["content"] == doomed else None

    with LocalChatServer(oracle, faults=faults) as server:
        with pytest.raises(EvaluationIncomplete, match="failed after retries"):
            run_evaluation(server, tmp_path / "out", concurrency=2)
    records = read_item_records(tmp_path / "out" / "items.jsonl")
    assert not [r for r in records if r["language"] == "sw" and r["item_id"] == "1"
                and r["benchmark"] == "mgsm"]
    results = read_results(tmp_path / "out")
    assert results["complete"] is False and "sw" not in results["benchmarks"].get("mgsm", {})
    answered_before = len(records)

    with LocalChatServer(oracle) as server:
        run_evaluation(server, tmp_path / "out")
        asked = len(server.requests)
    check_complete(tmp_path / "out", oracle)
    assert asked == total_items() - answered_before  # only the unanswered were asked


def test_resume_refuses_other_answer_settings(tmp_path):
    oracle = Oracle()
    with LocalChatServer(oracle) as server:
        run_evaluation(server, tmp_path / "out", benchmarks=("mgsm",), languages=("en",))
        backend = OpenAIBackend(server.base_url, "sara", SamplingSettings(temperature=0.7))
        runner = EvaluationRunner(backend, plan(benchmarks=("mgsm",), languages=("en",)),
                                  str(tmp_path / "out"), {"model": "sara", "temperature": 0.7},
                                  progress=False, say=lambda _: None)
        with pytest.raises(ValueError, match="temperature"):
            asyncio.run(runner.run())


def _tool(base_url, output, *extra):
    return [*launch.tool("evaluate"), "--backend", "openai",
            "--base-url", base_url, "--model", "sara", "--data-dir", str(FIXTURES),
            "--benchmarks", ",".join(BENCHMARKS), "--languages", ",".join(LANGUAGES),
            "--runs", str(RUNS), "--output", str(output), *extra]


@pytest.mark.multiprocess
def test_killed_run_resumes_without_reasking(tmp_path):
    oracle = Oracle()
    output = tmp_path / "out"
    items_file = output / "items.jsonl"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with LocalChatServer(oracle, latency_s=0.1) as server:
        proc = subprocess.Popen(_tool(server.base_url, output, "--concurrency", "2",
                                      "--no-progress"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if items_file.exists() and items_file.read_text(encoding="utf-8").count("\n") >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        before = {(r["benchmark"], r["language"], r["run"], r["item_id"])
                  for r in read_item_records(items_file)}
        assert 10 <= len(before) < total_items()
        asked_first = len(server.requests)

        done = subprocess.run(_tool(server.base_url, output, "--no-progress"),
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "resuming" in done.stderr
        second = server.requests[asked_first:]
    asked_again = set()
    for r in second:
        item, run = oracle.identify(r.body)
        asked_again.add((item.benchmark, item.language, run, item.item_id))
    assert not asked_again & before  # nothing answered before the kill was asked again
    assert len(second) == total_items() - len(before)
    check_complete(output, oracle)
    assert "| Global-MMLU | sara |" in done.stdout


@pytest.mark.multiprocess
def test_tool_refuses_bad_flags(tmp_path):
    base = [*launch.tool("evaluate"), "--output", str(tmp_path / "o")]
    cases = [
        (["--backend", "openai", "--model", "m"], "needs --base-url and --model"),
        (["--backend", "hf", "--model-dir", str(tmp_path / "none")], "--model-dir: no such folder"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
          "--benchmarks", "mmlu"], "--benchmarks: unknown mmlu"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
          "--template-language", "native"], "needs --templates"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
          "--chat-template-kwargs", "{bad"], "--chat-template-kwargs: not JSON"),
    ]
    for args, message in cases:
        proc = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


@pytest.mark.multiprocess
def test_chat_template_kwargs_and_native_templates_reach_the_server(tmp_path):
    templates = tmp_path / "templates.json"
    sw_math = "Swali:\n{question}\nWeka jibu la mwisho ndani ya \\boxed{}."
    templates.write_text(json.dumps({"sw": {"math": sw_math}}), encoding="utf-8")
    seen = []

    def responder(body):
        seen.append(body)
        return "\\boxed{0}"

    with LocalChatServer(responder) as server:
        proc = subprocess.run(
            [*launch.tool("evaluate"), "--backend", "openai",
             "--base-url", server.base_url, "--model", "sara", "--data-dir", str(FIXTURES),
             "--benchmarks", "mgsm", "--languages", "sw", "--runs", "1", "--limit", "1",
             "--template-language", "native", "--templates", str(templates),
             "--chat-template-kwargs", '{"enable_thinking": false}', "--top-k", "-1",
             "--output", str(tmp_path / "o"), "--no-progress"],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(seen) == 1  # one item, one run
    question = load_benchmark("mgsm", "sw", data_dir=FIXTURES)[0].question
    assert seen[0]["messages"][0]["content"] == sw_math.replace("{question}", question)
    assert seen[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert seen[0]["top_k"] == -1
    assert read_results(tmp_path / "o")["benchmarks"]["mgsm"]["sw"]["runs"] == [0.0]
