"""tools/translate_corpus.py against a real OpenAI-wire server on 127.0.0.1 (the rule-based
translator) that injects faults: the corpus is complete and correct, every fault is retried or
reported, a kill -9 and rerun repeats no paid request beyond those in flight, the key never lands
in a file or a log, --dry-run sends nothing, --batch goes through the Batch API; and the checks
themselves on real-language text."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import launch
import pytest

from sara_megatron.chat.client import PLACEHOLDER_API_KEY
from sara_megatron.chat.server import Fault, LocalChatServer
from sara_megatron.construction.rule_translator import RuleTranslator
from sara_megatron.construction.translation import TranslationConfig
from sara_megatron.construction.translation_run import run_translation
from sara_megatron.construction.translation_checks import LanguageIdentifier, check_translation
from sara_megatron.construction.translation_wire import parse_reply, read_request
from sara_megatron.data.corpus_validation import validate_corpus
from sara_megatron.data.synthetic_corpus import synthetic_record

REPO = Path(__file__).resolve().parents[1]
TOOL = launch.tool("translate_corpus")
FAKE_KEY = "sk-test-TRANSLATE-9f8e7d6c5b4a-DONOTLEAK"
TRANSLATOR = RuleTranslator()
TARGETS = ("hi", "sw")


def write_anchors(path: Path, n: int) -> list[dict]:
    records = [synthetic_record(f"demo-{i:05d}", "en", i, max_words=24) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def expected_corpus(anchors: list[dict]) -> dict[str, list[dict]]:
    corpus = {"en": anchors}
    for lang in TARGETS:
        corpus[lang] = [{**r, "lang": lang, "messages": [
            {"role": m["role"], "content": TRANSLATOR.translate(m["content"], lang)}
            for m in r["messages"]]} for r in anchors]
    return corpus


def read_corpus(out: Path) -> dict[str, list[dict]]:
    return {lang: [json.loads(line) for line in (out / f"{lang}.jsonl").read_text().splitlines()]
            for lang in ("en", *TARGETS)}


def read_failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "translation_failures.jsonl").read_text().splitlines()]


def tool_env() -> dict:
    return dict(os.environ, OPENAI_API_KEY=FAKE_KEY, PYTHONWARNINGS="ignore")


def run_tool(server, anchors: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*TOOL, "--input", str(anchors), "--languages", ",".join(TARGETS),
           "--output", str(out), "--model", "rule-translator", "--base-url", server.base_url,
           "--concurrency", "4", *extra]
    return subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, timeout=120)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config(anchors: Path, out: Path, server, **kw) -> TranslationConfig:
    kw = {"concurrency": 4, "progress": False, **kw}
    return TranslationConfig(input_path=str(anchors), output_dir=str(out), languages=TARGETS,
                             model=kw.pop("model", "rule-translator"), base_url=server.base_url, **kw)


# -- a translator with faults: the reply in the request's shape, spoilt ---------------------------

def spoilt_reply(body: dict, spoil) -> str:
    target, texts = read_request(body)
    good = {k: TRANSLATOR.translate(v, target) for k, v in texts.items()}
    return json.dumps({k: spoil(k, v, texts[k]) for k, v in good.items()}, ensure_ascii=False)


def wrong_script(body):  # the source copied back: Latin letters where hi needs Devanagari
    return Fault.reply(spoilt_reply(body, lambda k, good, source: source))


def lost_box(body):
    return Fault.reply(spoilt_reply(body, lambda k, good, source: good.split("\\boxed")[0]))


def truncated(body):
    return Fault.reply(spoilt_reply(body, lambda k, good, source: good[: len(good) // 2]), "length")


@pytest.mark.multiprocess
def test_faults_are_retried_and_the_corpus_is_complete_and_correct(tmp_path):
    anchors = write_anchors(tmp_path / "en.jsonl", 12)
    plan = {0: Fault.rate_limit(0.2), 1: Fault.server_error(500), 2: Fault.drop_connection(),
            3: Fault.garbage_body(), 4: wrong_script, 5: lost_box, 6: truncated}

    def faults(index, body):
        fault = plan.get(index)
        if callable(fault):
            target, _ = read_request(body)
            return fault(body) if (fault is not wrong_script or target == "hi") else lost_box(body)
        return fault

    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR, faults=faults) as server:
        summary = summary_of(run_tool(server, tmp_path / "en.jsonl", out, "--max-retries", "3"))
        outcomes = server.outcomes()
        recorded = list(server.requests)
    assert outcomes[:7] == ["rate_limit", "server_error", "drop_connection", "garbage_body",
                            "reply", "reply", "reply"]
    assert read_corpus(out) == expected_corpus(anchors)
    assert read_failures(out) == []
    # 24 jobs; 4 transport faults retried by the client, 3 rejected replies asked again.
    assert summary["translated"] == 24 and summary["failed"] == 0 and summary["cached"] == 0
    assert summary["retries"] == 7 and summary["requested"] == 24 + 3
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    stricter = [r.body["messages"][0]["content"] for r in recorded
                if "was rejected" in r.body["messages"][0]["content"]]
    assert len(stricter) == 3
    assert any("\\boxed{" in s and "missing" in s for s in stricter)  # names the lost answer
    # The corpus is one shard_corpus accepts as it is (strict: any bad record fails).
    validated = validate_corpus([out / f"{lang}.jsonl" for lang in ("en", *TARGETS)], "en",
                                strict=True)
    assert validated.summary()["kept"] == {"en": 12, "hi": 12, "sw": 12}
    # OPENAI_API_KEY was in the environment; a server other than OpenAI's never saw it.
    assert all(r.headers["Authorization"] == f"Bearer {PLACEHOLDER_API_KEY}" for r in recorded)
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_a_persistent_fault_is_reported_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    anchors = write_anchors(tmp_path / "en.jsonl", 4)
    doomed = anchors[2]["messages"][0]["content"]

    def faults(index, body):  # demo-00002's hi translation always loses its box
        target, texts = read_request(body)
        if target == "hi" and doomed in texts.values():
            return lost_box(body)
        return None

    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR, faults=faults) as server:
        summary = run_translation(config(tmp_path / "en.jsonl", out, server, max_retries=2))
        attempts = [r for r in server.requests if doomed in r.body["messages"][1]["content"]
                    and "(hi)" in r.body["messages"][0]["content"]]
    assert len(attempts) == 3  # the first and max_retries stricter ones
    assert read_failures(out) == [{"id": "demo-00002", "language": "hi", "reason": "lost_boxed"}]
    corpus, expected = read_corpus(out), expected_corpus(anchors)
    assert corpus["hi"] == [r for r in expected["hi"] if r["id"] != "demo-00002"]
    assert corpus["sw"] == expected["sw"] and corpus["en"] == anchors
    assert (summary["translated"], summary["failed"], summary["retries"]) == (7, 1, 2)


@pytest.mark.multiprocess
def test_kill_and_rerun_pays_for_nothing_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    anchors = write_anchors(tmp_path / "en.jsonl", 40)
    with LocalChatServer(TRANSLATOR, latency_s=0.05) as server:
        # The uninterrupted run, in this process (the killed one is a subprocess).
        reference = run_translation(config(tmp_path / "en.jsonl", tmp_path / "reference", server))
        assert reference["requested"] == 80
        server.requests.clear()

        out = tmp_path / "corpus"
        cmd = [*TOOL, "--input", str(tmp_path / "en.jsonl"), "--languages", "hi,sw",
               "--output", str(out), "--model", "rule-translator", "--base-url", server.base_url,
               "--concurrency", "4", "--no-progress"]
        proc = subprocess.Popen(cmd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while server.outcomes().count("ok") < 30 and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)  # replies the killed process could no longer read are recorded too
        seen_before_rerun = len(server.requests)
        first_run = [r for r in server.requests if r.outcome == "ok"]
        assert 30 <= len(first_run) < 80
        assert not (out / "hi.jsonl").exists()  # killed before the corpus was written

        rerun = summary_of(run_tool(server, tmp_path / "en.jsonl", out))
        second_run = [r for r in server.requests[seen_before_rerun:] if r.outcome == "ok"]
    assert read_corpus(out) == read_corpus(tmp_path / "reference") == expected_corpus(anchors)
    sent = lambda r: json.dumps(r.body["messages"])  # noqa: E731
    repeated = {sent(r) for r in first_run} & {sent(r) for r in second_run}
    # Only the requests in flight at the kill (at most --concurrency) are asked again.
    assert len(repeated) <= 4
    # Everything else that came back before the kill was taken from the cache.
    assert rerun["cached"] == len(first_run) - len(repeated)
    assert rerun["requested"] == len(second_run) == 80 - rerun["cached"]


@pytest.mark.multiprocess
def test_dry_run_sends_nothing_and_estimates(tmp_path):
    anchors = write_anchors(tmp_path / "en.jsonl", 5)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"rule-translator": {"input": 1.0, "output": 4.0}}))
    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR) as server:
        dry = summary_of(run_tool(server, tmp_path / "en.jsonl", out, "--dry-run",
                                  "--prices", str(prices)))
        assert server.requests == [] and not out.exists()
        assert dry["requested"] == 10 and dry["dry_run"] is True
        assert 0 < dry["estimated_cost_usd"] < 0.01
        real = summary_of(run_tool(server, tmp_path / "en.jsonl", out, "--prices", str(prices)))
        sent = len(server.requests)
        again = summary_of(run_tool(server, tmp_path / "en.jsonl", out, "--dry-run"))
        assert len(server.requests) == sent == 10
    assert real["translated"] == 10 and real["estimated_cost_usd"] > 0
    assert again["requested"] == 0 and again["cached"] == 10
    assert read_corpus(out) == expected_corpus(anchors)


@pytest.mark.multiprocess
def test_samples_over_the_context_limit_are_refused_before_any_request(tmp_path):
    anchors = write_anchors(tmp_path / "short.jsonl", 3)
    # ~50k tokens at 4 bytes a token: over the 32768 of a model not in the built-in table.
    long = [{**synthetic_record(f"long-{i}", "en", 100 + i), "id": f"long-{i}"} for i in range(12)]
    for record in long:
        record["messages"][0]["content"] = "word " * 40_000
    (tmp_path / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in anchors + long))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"rule-translator": {"input": 1.0, "output": 4.0}}))
    out = tmp_path / "corpus"
    with LocalChatServer(TRANSLATOR) as server:
        proc = run_tool(server, tmp_path / "en.jsonl", out, "--no-progress")
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "translate_corpus: error: 12 sample(s) too long for the model's context, refused "
            "before any request: long-0 (~"), lines
        named = [f"long-{i} (" for i in range(12) if f"long-{i} (" in lines[0]]
        assert len(named) == 10 and ", and 2 more;" in lines[0] and "32768" in lines[0]
        assert server.requests == [] and not out.exists()
        # --dry-run counts them and prices the rest only.
        dry = summary_of(run_tool(server, tmp_path / "en.jsonl", out, "--dry-run",
                                  "--prices", str(prices)))
        short = summary_of(run_tool(server, tmp_path / "short.jsonl", out, "--dry-run",
                                    "--prices", str(prices)))
        assert dry["over_context_limit"] == 12 and short["over_context_limit"] == 0
        assert dry["requested"] == short["requested"] == 6
        assert dry["estimated_cost_usd"] == short["estimated_cost_usd"] < 0.01
        # A higher limit lets them through.
        proc = run_tool(server, tmp_path / "en.jsonl", out, "--dry-run",
                        "--max-context-tokens", "1000000")
        assert summary_of(proc)["over_context_limit"] == 0
        assert server.requests == [] and not out.exists()


def test_max_cost_stops_before_the_limit_and_a_rerun_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    anchors = write_anchors(tmp_path / "en.jsonl", 10)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"rule-translator": {"input": 100.0, "output": 100.0}}))
    with LocalChatServer(TRANSLATOR) as server:
        first = run_translation(config(tmp_path / "en.jsonl", tmp_path / "c", server,
                                       prices_path=str(prices), max_cost_usd=0.2, concurrency=1))
        assert first["stopped"] == "max_cost_usd"
        assert 0 < first["estimated_cost_usd"] <= 0.2 and 0 < first["translated"] < 20
        failures = read_failures(tmp_path / "c")
        assert {f["reason"] for f in failures} == {"cost_limit"}
        assert len(failures) == 20 - first["translated"]
        sent = len(server.requests)
        second = run_translation(config(tmp_path / "en.jsonl", tmp_path / "c", server,
                                        prices_path=str(prices), max_cost_usd=100.0))
        assert len(server.requests) - sent == 20 - first["translated"]  # only the rest
    assert second["cached"] == first["translated"] and second["translated"] == 20
    assert read_corpus(tmp_path / "c") == expected_corpus(anchors)


def test_split_messages_and_structured_output(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    anchors = write_anchors(tmp_path / "en.jsonl", 3)
    with LocalChatServer(TRANSLATOR) as server:
        run_translation(config(tmp_path / "en.jsonl", tmp_path / "split", server, split_messages=True))
        plain = [r.body["messages"][1]["content"] for r in server.requests]
        assert len(plain) == 12 and not any(p.lstrip().startswith("{") for p in plain)
        server.requests.clear()
        run_translation(config(tmp_path / "en.jsonl", tmp_path / "json", server, structured_output=True))
        body = server.requests[0].body
    schema = body["response_format"]["json_schema"]["schema"]
    assert sorted(schema["required"]) == ["0_user", "1_assistant"]
    assert read_corpus(tmp_path / "split") == read_corpus(tmp_path / "json") == expected_corpus(anchors)


@pytest.mark.multiprocess
def test_gpt5_family_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    write_anchors(tmp_path / "en.jsonl", 1)
    with LocalChatServer(TRANSLATOR) as server:
        run_translation(config(tmp_path / "en.jsonl", tmp_path / "c", server, model="gpt-5-mini",
                               max_tokens=4000))
        body = server.requests[0].body
    assert body["model"] == "gpt-5-mini" and body["reasoning_effort"] == "low"
    assert body["max_completion_tokens"] == 4000
    assert "temperature" not in body and "max_tokens" not in body
    proc = subprocess.run([*TOOL, "--input", str(tmp_path / "en.jsonl"),
                           "--languages", "hi", "--output", str(tmp_path / "x"), "--model",
                           "gpt-5-mini", "--temperature", "0.2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "translate_corpus: error: --temperature" in proc.stderr


@pytest.mark.multiprocess
def test_a_refused_key_stops_the_run(tmp_path):
    write_anchors(tmp_path / "en.jsonl", 3)
    with LocalChatServer(TRANSLATOR, faults=lambda i, body: Fault.server_error(401)) as server:
        proc = run_tool(server, tmp_path / "en.jsonl", tmp_path / "corpus", "--no-progress")
        refused = len(server.requests)
    assert proc.returncode == 2 and refused <= 4  # at most one round of --concurrency requests
    assert "translate_corpus: error: the server refused the requests (http_401)" in proc.stderr
    assert FAKE_KEY not in proc.stderr + proc.stdout
    # Nothing listening at --base-url: one error line, not every pair failed one by one.
    with LocalChatServer(TRANSLATOR) as server:
        pass  # a port that was just free; now nothing answers on it
    proc = run_tool(server, tmp_path / "en.jsonl", tmp_path / "corpus", "--max-retries", "1")
    assert proc.returncode == 2 and "error: no reply from" in proc.stderr


@pytest.mark.multiprocess
def test_batch_end_to_end_and_resume_after_a_kill(tmp_path):
    anchors = write_anchors(tmp_path / "en.jsonl", 6)

    def faults(index, body):  # the first hi line loses its box: a second, stricter round
        target, _ = read_request(body)
        return lost_box(body) if index == 0 else None

    with LocalChatServer(TRANSLATOR, faults=faults, batch_delay_s=1.5) as server:
        out = tmp_path / "corpus"
        cmd = [*TOOL, "--input", str(tmp_path / "en.jsonl"), "--languages", "hi,sw",
               "--output", str(out), "--model", "rule-translator", "--base-url", server.base_url,
               "--batch", "--batch-poll-s", "0.1", "--no-progress"]
        proc = subprocess.Popen(cmd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not server.batches and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the batch id is recorded right after it is created
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(server.batches) == 1 and server.requests == []  # still in progress

        summary = summary_of(subprocess.run(cmd, env=tool_env(), capture_output=True, text=True,
                                            timeout=120))
        batches = list(server.batches.values())
        lines = list(server.requests)
    # The rerun polled the killed run's batch, then one stricter round for the rejected reply.
    assert len(batches) == 2
    assert [b["request_counts"]["total"] for b in batches] == [12, 1]
    assert len(lines) == 13 and all(r.path == "batch" for r in lines)
    assert "was rejected" in lines[-1].body["messages"][0]["content"]
    assert read_corpus(out) == expected_corpus(anchors) and read_failures(out) == []
    assert summary["translated"] == 12 and summary["requested"] == 13 and summary["retries"] == 1
    assert all(r.headers["Authorization"] == f"Bearer {PLACEHOLDER_API_KEY}" for r in lines)
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    requests_file = next((out / "batch_requests").glob("*.jsonl")).read_text().splitlines()
    assert json.loads(requests_file[0])["url"] == "/v1/chat/completions"


def test_the_demo_tokenizer_covers_the_rule_translators_devanagari(tmp_path):
    from sara_megatron.data.local_tokenizer import build_local_tokenizer

    anchors = [synthetic_record(f"demo-{i:05d}", "en", i, max_words=24) for i in range(24)]
    corpus = expected_corpus(anchors)
    texts = [m["content"] for lang in corpus for r in corpus[lang] for m in r["messages"]]
    hindi = [m["content"] for r in corpus["hi"] for m in r["messages"]]
    assert all(check_translation(a["messages"][1]["content"], h["messages"][1]["content"], "hi")
               is None for a, h in zip(anchors, corpus["hi"]))
    tokenizer = build_local_tokenizer(texts, tmp_path / "tok", vocab_size=200)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    ids = [i for text in hindi for i in tokenizer(text)["input_ids"]]
    assert ids and unk not in ids


# -- the checks on real-language text -------------------------------------------------------------

EN = "Janet's ducks lay 16 eggs per day. She sells the rest for $2 each, so she makes \\boxed{18} dollars."
HI = "जेनेट की बत्तखें रोज़ 16 अंडे देती हैं। वह बाकी अंडे $2 में बेचती है, तो वह \\boxed{18} डॉलर कमाती है।"
SW = "Bata wa Janet hutaga mayai 16 kwa siku. Anauza yaliyobaki kwa $2 kila moja, hivyo anapata dola \\boxed{18}."


@pytest.fixture(scope="module")
def identifier():
    return LanguageIdentifier(("en", "hi", "sw"))


@pytest.mark.parametrize("language, translation, reason", [
    ("hi", HI, None),
    ("hi", HI.replace("\\boxed{18}", "\\boxed{१८}"), None),          # native digits: same number
    ("hi", HI.replace("\\boxed{18}", "18"), "lost_boxed"),
    ("hi", HI.replace("\\boxed{18}", "\\boxed{19}"), "wrong_boxed"),
    ("hi", EN.replace("Janet's", "Janet"), "wrong_script"),          # English where Hindi belongs
    ("sw", SW, None),
    ("sw", EN.replace("Janet's", "Janet"), "wrong_language"),       # English where Swahili belongs
    ("sw", "   ", "empty"),
    ("hi", "$x^2 + \\frac{a}{b}$ " + HI, None),                      # math letters are not counted
])
def test_checks_on_real_text(identifier, language, translation, reason):
    assert check_translation(EN, translation, language, identifier) == reason


def test_a_copy_is_rejected(identifier):
    # Words the identifier cannot place (the demo's pseudo-words) pass the language check, so
    # only the copy check catches the source sent back; formulas alone are no copy.
    source = "kalo mipe rasi tovezu ?"
    assert check_translation(source, "kalo  Mipe rasi tovezu ?", "sw", identifier) == "copy"
    assert check_translation(source, "tovezu rasi mipe kalo ?", "sw", identifier) is None
    assert check_translation("$2 + 3 = ?$", "$2 + 3 = ?$", "sw", identifier) is None


def test_reply_shapes():
    keys = ["0_user", "1_assistant"]
    good = {"0_user": "a", "1_assistant": "b \\boxed{1}"}
    assert parse_reply(json.dumps(good), keys) == good
    assert parse_reply("```json\n" + json.dumps(good) + "\n```", keys) == good
    assert parse_reply("Here it is: " + json.dumps(good), keys) == good
    assert parse_reply(json.dumps({"0_user": "a"}), keys) is None           # a key missing
    assert parse_reply(json.dumps({**good, "1_assistant": 3}), keys) is None  # not a string
    assert parse_reply("not json", keys) is None
    assert parse_reply("  plain text \n", ["0_user"]) == {"0_user": "plain text"}
    # LaTeX written with single backslashes inside JSON (a backspace, a form feed, a tab...):
    # the source's commands are read as commands; an escaped backslash and a real newline stay.
    sources = ["Half of 36?", "\\frac{36}{2} \\times 1 = \\boxed{18}"]
    hand_written = '{"0_user": "Nusu ya 36?\\nSawa", "1_assistant": "\\frac{36}{2} \\times 1 = \\boxed{18}"}'
    assert json.loads(hand_written)["1_assistant"].startswith("\x0crac")
    assert parse_reply(hand_written, keys, sources) == {
        "0_user": "Nusu ya 36?\nSawa", "1_assistant": "\\frac{36}{2} \\times 1 = \\boxed{18}"}
    escaped = json.dumps({"0_user": "x", "1_assistant": sources[1]})
    assert parse_reply(escaped, keys, sources)["1_assistant"] == sources[1]
