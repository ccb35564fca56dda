"""The key stays with its owner: translate_corpus, answer_anchors and evaluate, run as processes
against a real OpenAI-wire server on 127.0.0.1 with OPENAI_API_KEY in their environment, never
send that key to it unless the user named a variable holding it (--api-key-env); the key of a
named variable travels in the Authorization header and lands in no file and no log (openai's
debug logging switched on)."""

import json
from pathlib import Path

import pytest

import launch
from sara_megatron.chat.client import PLACEHOLDER_API_KEY
from sara_megatron.chat.server import LocalChatServer
from sara_megatron.construction.rule_translator import RuleTranslator
from sara_megatron.data.synthetic_corpus import synthetic_record

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[1]
CONSTRUCTION_DATA = REPO / "tests" / "fixtures" / "construction"
BENCHMARK_DATA = REPO / "tests" / "fixtures" / "benchmarks"
OPENAI_KEY = "sk-test-OPENAI-only-5e4d3c2b1a-NEVERSENT"
LOCAL_KEY = "local-server-key-77aa88bb99cc-NEVERLOGGED"


def run_tool(tool: str, *args, cwd: Path, **env: str):
    """The tool as a process, OPENAI_API_KEY (and `env`) in its environment, openai's debug
    logging on."""
    cmd = launch.tool(tool, *args)
    import subprocess

    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180,
                          env=launch.environment(OPENAI_API_KEY=OPENAI_KEY, OPENAI_LOG="debug",
                                                 **env))


def write_anchors(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps(synthetic_record(f"demo-{i:05d}", "en", i, max_words=12))
                            + "\n" for i in range(n)))
    return path


def assert_nowhere(secret: str, proc, folder: Path) -> None:
    assert secret not in proc.stdout + proc.stderr
    for path in folder.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def authorizations(server) -> set:
    return {r.headers.get("Authorization") for r in server.requests}


def translate(server, tmp_path: Path, out: str, *extra: str, **env: str):
    anchors = write_anchors(tmp_path / "anchors.jsonl")
    return run_tool("translate_corpus", "--input", anchors, "--languages", "hi", "--output",
                    tmp_path / out, "--model", "rule-translator", "--base-url", server.base_url,
                    "--no-progress", *extra, cwd=tmp_path, **env)


def test_translate_corpus_sends_openai_key_nowhere_but_openai(tmp_path):
    with LocalChatServer(RuleTranslator()) as server:
        plain = translate(server, tmp_path, "plain")
        sent_plain = authorizations(server)
        server.requests.clear()
        named = translate(server, tmp_path, "named", "--api-key-env", "LOCAL_KEY",
                          LOCAL_KEY=LOCAL_KEY)
        sent_named = authorizations(server)
        server.requests.clear()
        same_value = translate(server, tmp_path, "same", "--api-key-env", "MIRRORED_OPENAI_KEY",
                               MIRRORED_OPENAI_KEY=OPENAI_KEY)
        sent_same_value = authorizations(server)
    assert plain.returncode == named.returncode == same_value.returncode == 0, plain.stderr
    assert sent_plain == {f"Bearer {PLACEHOLDER_API_KEY}"}
    assert sent_named == {f"Bearer {LOCAL_KEY}"}
    assert sent_same_value == {f"Bearer {OPENAI_KEY}"}  # the user named a variable holding it
    for proc, folder in ((plain, tmp_path / "plain"), (named, tmp_path / "named")):
        assert_nowhere(OPENAI_KEY, proc, folder)
        assert_nowhere(LOCAL_KEY, proc, folder)
    assert "DEBUG] Building HTTP request" in plain.stderr  # openai's debug log was on


def test_api_key_env_refusals_do_not_repeat_a_key(tmp_path):
    with LocalChatServer(RuleTranslator()) as server:
        openai_named = translate(server, tmp_path, "a", "--api-key-env", "OPENAI_API_KEY")
        pasted = translate(server, tmp_path, "b", "--api-key-env", OPENAI_KEY)
        unset = translate(server, tmp_path, "c", "--api-key-env", "NO_SUCH_VARIABLE_SET")
        assert server.requests == []
    assert openai_named.returncode == 2
    assert openai_named.stderr.strip().splitlines()[-1] == (
        "translate_corpus: error: --api-key-env OPENAI_API_KEY: that key is sent only to "
        f"OpenAI's API (https://api.openai.com/v1); put the key for {server.base_url} in a "
        "variable of another name and name that one")
    assert pasted.returncode == 2 and "never the key itself" in pasted.stderr
    assert OPENAI_KEY not in pasted.stderr + pasted.stdout
    assert unset.returncode == 2 and unset.stderr.strip().splitlines()[-1] == (
        "translate_corpus: error: no API key: the variable named by --api-key-env is not set in "
        "the environment (or is empty)")
    assert not (tmp_path / "c").exists()  # refused: nothing written


def test_answer_anchors_sends_openai_key_nowhere_but_openai(tmp_path):
    def answer(server, out, *extra, **env):
        return run_tool("answer_anchors", "--base-url", server.base_url, "--model", "local",
                        "--data-dir", CONSTRUCTION_DATA, "--sources", "gsm8k", "--limit", "2",
                        "--output", tmp_path / out, "--no-progress", *extra, cwd=tmp_path, **env)

    with LocalChatServer(lambda body: "\\boxed{8}") as server:
        plain = answer(server, "plain.jsonl")
        sent_plain = authorizations(server)
        server.requests.clear()
        named = answer(server, "named.jsonl", "--api-key-env", "LOCAL_KEY", LOCAL_KEY=LOCAL_KEY)
        sent_named = authorizations(server)
        server.requests.clear()
        refused = answer(server, "refused.jsonl", "--api-key-env", "OPENAI_API_KEY")
        assert server.requests == []
    assert plain.returncode == named.returncode == 0, plain.stderr
    assert sent_plain == {f"Bearer {PLACEHOLDER_API_KEY}"} and sent_named == {f"Bearer {LOCAL_KEY}"}
    assert refused.returncode == 2
    assert "answer_anchors: error: --api-key-env OPENAI_API_KEY: that key is sent only" in refused.stderr
    for proc in (plain, named):
        assert_nowhere(OPENAI_KEY, proc, tmp_path)
        assert_nowhere(LOCAL_KEY, proc, tmp_path)


def test_evaluate_sends_openai_key_nowhere_but_openai(tmp_path):
    # evaluate builds its client through the same ChatClient; its --api-key-env defaults to
    # OPENAI_API_KEY, which still goes to OpenAI's API only.
    with LocalChatServer(lambda body: "\\boxed{A}") as server:
        proc = run_tool("evaluate", "--backend", "openai", "--base-url", server.base_url,
                        "--model", "sara", "--data-dir", BENCHMARK_DATA, "--benchmarks",
                        "belebele", "--languages", "en", "--runs", "1", "--limit", "2",
                        "--output", tmp_path / "eval", "--no-progress", cwd=tmp_path)
        sent = authorizations(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sent == {f"Bearer {PLACEHOLDER_API_KEY}"}
    assert_nowhere(OPENAI_KEY, proc, tmp_path / "eval")
