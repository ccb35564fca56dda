"""The chat client against a real HTTP server on 127.0.0.1 that injects faults: every fault kind
is retried and counted, Retry-After is honoured, exhausted retries raise, the concurrency bound
holds, the API key travels in the Authorization header only, and OPENAI_API_KEY goes to OpenAI's
own API only."""

import asyncio
import json
import logging
import time

import pytest

from sara_megatron.chat.cache import ReplyCache, request_key
from sara_megatron.chat.client import (
    PLACEHOLDER_API_KEY, ChatClient, ChatReply, ChatRequestFailed, ChatSettings, api_key_for,
    check_api_key_env, is_openai_api,
)
from sara_megatron.chat.server import Fault, LocalChatServer

FAKE_KEY = "sk-test-0123456789abcdefNEVERLOGGED"
SETTINGS = ChatSettings("local-model", temperature=0.0, max_tokens=64)


def echo(body: dict) -> str:
    return "echo: " + body["messages"][-1]["content"]


def run_requests(server, prompts, *, settings=SETTINGS, **client_kwargs):
    """Send one chat request per prompt concurrently; return (results or exceptions, stats)."""

    async def main():
        client = ChatClient(server.base_url, **client_kwargs)
        try:
            results = await asyncio.gather(
                *(client.complete([{"role": "user", "content": p}], settings) for p in prompts),
                return_exceptions=True)
        finally:
            await client.aclose()
        return results, client.stats

    return asyncio.run(main())


@pytest.fixture
def api_key(monkeypatch):
    """A key for the local server, in a variable the requests name (OPENAI_API_KEY, set too,
    must stay home)."""
    monkeypatch.setenv("LOCAL_SERVER_KEY", FAKE_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    return FAKE_KEY


OPENAI_KEY = "sk-test-openai-only-0123456789NEVERSENT"


def test_every_fault_kind_is_retried_and_counted(api_key):
    faults = [Fault.rate_limit(0.05), Fault.server_error(500), Fault.server_error(503),
              Fault.drop_connection(), Fault.garbage_body(), Fault.no_choices(),
              Fault.null_content(), Fault.slow(3.0)]
    with LocalChatServer(echo, faults=faults) as server:
        (reply,), stats = run_requests(server, ["hello"], backoff_base_s=0.01, max_retries=8,
                                       timeout_s=0.5)
        outcomes = server.outcomes()
    assert isinstance(reply, ChatReply), reply
    assert reply.content == "echo: hello" and reply.finish_reason == "stop"
    assert reply.attempts == len(faults) + 1
    assert outcomes == [f.name for f in faults] + ["ok"]
    assert dict(stats.retry_reasons) == {"rate_limit": 1, "server_error": 2, "connection": 1,
                                         "unparsable_body": 1, "no_choices": 1,
                                         "null_content": 1, "timeout": 1}
    assert (stats.requests, stats.retries, stats.succeeded, stats.failures) == (9, 8, 1, 0)
    assert stats.completion_tokens == reply.completion_tokens > 0


def test_retry_after_is_honoured(api_key):
    with LocalChatServer(echo, faults=[Fault.rate_limit(0.8)]) as server:
        started = time.monotonic()
        (reply,), stats = run_requests(server, ["x"], backoff_base_s=0.01)
        elapsed = time.monotonic() - started
        first, second = server.requests
    assert reply.content == "echo: x" and stats.retry_reasons["rate_limit"] == 1
    # The server saw the retry no sooner than it asked; backoff alone would have waited ~0.01 s.
    assert second.time - first.time >= 0.8
    assert elapsed < 0.8 + 1.5
    # Control: the same fault without the header's long wait is retried at backoff speed.
    with LocalChatServer(echo, faults=[Fault.server_error(500)]) as server:
        run_requests(server, ["x"], backoff_base_s=0.01)
        first, second = server.requests
    assert second.time - first.time < 0.5


def test_retry_after_holds_back_the_other_requests(api_key):
    # Request 0 is rate limited for 0.8 s; requests sent after it arrive only once that passed.
    with LocalChatServer(echo, faults=[Fault.rate_limit(0.8)], latency_s=0.0) as server:
        run_requests(server, [f"p{i}" for i in range(6)], concurrency=1, backoff_base_s=0.01)
        times = [r.time for r in server.requests]
    assert len(times) == 7
    assert all(t - times[0] >= 0.8 for t in times[1:])


def test_exhausted_retries_and_unretryable_errors_raise(api_key):
    with LocalChatServer(echo, faults=lambda index, body: Fault.server_error(502)) as server:
        (error,), stats = run_requests(server, ["x"], backoff_base_s=0.01, max_retries=2)
        assert len(server.requests) == 3
    assert isinstance(error, ChatRequestFailed)
    assert (error.reason, error.attempts) == ("server_error", 3)
    assert (stats.failures, stats.retries, stats.succeeded) == (1, 2, 0)

    with LocalChatServer(echo, faults=[Fault.server_error(400)]) as server:  # a bad request
        (error,), stats = run_requests(server, ["x"], backoff_base_s=0.01)
        assert len(server.requests) == 1
    assert isinstance(error, ChatRequestFailed)
    assert (error.reason, error.attempts, stats.retries) == ("http_400", 1, 0)


def test_concurrency_bound_holds(api_key):
    with LocalChatServer(echo, latency_s=0.15) as server:
        results, stats = run_requests(server, [f"p{i}" for i in range(16)], concurrency=4)
        assert server.max_in_flight == 4
    assert [r.content for r in results] == [f"echo: p{i}" for i in range(16)]
    assert stats.requests == 16


def test_key_travels_only_in_the_authorization_header(api_key, caplog):
    caplog.set_level(logging.DEBUG)  # openai's and httpx's own debug logging included
    faults = [Fault.rate_limit(0.01), Fault.server_error(), None, Fault.server_error(401)]
    with LocalChatServer(echo, faults=faults) as server:
        results, _ = run_requests(server, ["a", "b", "c"], backoff_base_s=0.01, concurrency=1,
                                  api_key_env="LOCAL_SERVER_KEY")
        recorded = list(server.requests)
    assert len(recorded) == 5
    for request in recorded:
        assert request.headers["Authorization"] == f"Bearer {api_key}"
        others = {k: v for k, v in request.headers.items() if k != "Authorization"}
        assert api_key not in json.dumps(others) and api_key not in json.dumps(request.body)
    assert caplog.text and api_key not in caplog.text
    assert all(api_key not in str(r) for r in results)  # the 401's ChatRequestFailed included
    assert any(isinstance(r, ChatRequestFailed) and r.reason == "http_401" for r in results)


def test_key_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        ChatClient(None)  # OpenAI itself needs a key
    with LocalChatServer(echo) as server:  # a self-hosted server gets the placeholder
        (reply,), _ = run_requests(server, ["x"])
        assert server.requests[0].headers["Authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"
    assert reply.content == "echo: x"
    monkeypatch.setenv("MY_KEY", FAKE_KEY)
    assert FAKE_KEY not in repr(ChatClient("http://127.0.0.1:1/v1", api_key_env="MY_KEY"))
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ValueError, match="--api-key-env") as refused:
        ChatClient("http://127.0.0.1:1/v1", api_key_env="MY_KEY")  # named, but not set
    assert "MY_KEY" not in str(refused.value)


def test_openai_key_goes_to_openai_only(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("SAME_VALUE_NAMED", OPENAI_KEY)
    with LocalChatServer(echo) as server:
        run_requests(server, ["default"])
        run_requests(server, ["a caller's default name"], api_key_env="OPENAI_API_KEY")
        run_requests(server, ["named by the user"], api_key_env="SAME_VALUE_NAMED")
        sent = [r.headers["Authorization"] for r in server.requests]
    # No request carries the environment's OPENAI_API_KEY unless the user named a variable.
    assert sent == [f"Bearer {PLACEHOLDER_API_KEY}"] * 2 + [f"Bearer {OPENAI_KEY}"]
    # OpenAI's own API (no request sent: the key is only resolved).
    assert api_key_for(None) == api_key_for("https://api.openai.com/v1") == OPENAI_KEY
    for other in ("http://api.openai.com/v1", "https://api.openai.com.example.net/v1",
                  "https://example.net/api.openai.com/v1", "https://api.openai.com:8443/v1",
                  "https://eu.api.openai.com/v1", "http://127.0.0.1:8000/v1"):
        assert not is_openai_api(other), other
        assert api_key_for(other) == PLACEHOLDER_API_KEY
    assert is_openai_api("https://API.OpenAI.com/v1") and is_openai_api(None)


def test_api_key_env_names_a_variable_never_a_key():
    check_api_key_env("http://127.0.0.1:8000/v1", "VLLM_KEY")
    check_api_key_env(None, "OPENAI_API_KEY")
    with pytest.raises(ValueError, match="sent only to OpenAI's API"):
        check_api_key_env("http://127.0.0.1:8000/v1", "OPENAI_API_KEY")
    with pytest.raises(ValueError, match="never the key itself") as refused:
        check_api_key_env("http://127.0.0.1:8000/v1", FAKE_KEY)
    assert FAKE_KEY not in str(refused.value)


def test_reasoning_models_get_their_own_settings(api_key):
    gpt5 = ChatSettings("gpt-5-mini", max_tokens=300, reasoning_effort="low", seed=3)
    assert gpt5.request_kwargs() == {"model": "gpt-5-mini", "max_completion_tokens": 300,
                                     "reasoning_effort": "low", "seed": 3}
    with pytest.raises(ValueError, match="default temperature"):
        ChatSettings("gpt-5-mini", temperature=0.2)
    with pytest.raises(ValueError, match="default temperature"):
        ChatSettings("o4-mini", top_p=0.9)
    plain = ChatSettings("Qwen/Qwen3-30B-A3B", temperature=0.6, top_p=0.95, max_tokens=100)
    assert plain.request_kwargs() == {"model": "Qwen/Qwen3-30B-A3B", "temperature": 0.6,
                                      "top_p": 0.95, "max_tokens": 100}
    with LocalChatServer(echo) as server:
        run_requests(server, ["x"], settings=gpt5)
        body = server.requests[0].body
    assert body["max_completion_tokens"] == 300 and body["reasoning_effort"] == "low"
    assert "temperature" not in body and "max_tokens" not in body


def test_reply_cache_survives_reopening(tmp_path):
    key = request_key(model="m", prompt_version="v1", language="hi", content="text",
                      settings=SETTINGS.as_dict())
    assert key != request_key(model="m", prompt_version="v2", language="hi", content="text",
                              settings=SETTINGS.as_dict())
    with ReplyCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(key) is None
        cache.put(key, ChatReply("नमस्ते", "stop", 5, 7, 1), model="m", language="hi", attempt=0)
        cache.record_batch("batch-1", "file-1", [key])
    with ReplyCache(tmp_path / "c.sqlite") as cache:
        hit = cache.get(key)
        assert (hit.content, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens) == \
            ("नमस्ते", "stop", 5, 7)
        assert cache.pending_batches() == [("batch-1", [key])]
        cache.finish_batch("batch-1", "completed")
        assert cache.pending_batches() == []
        mode = cache._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
