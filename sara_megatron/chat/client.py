"""A chat-completions client for any OpenAI-compatible endpoint, built to run unattended for hours.

`openai.AsyncOpenAI` does the HTTP; its own retries are switched off (`max_retries=0`) so that
attempts do not multiply with ours. Ours retry what a later attempt can fix:

- 429 rate limits, waiting what `Retry-After` / `retry-after-ms` asks (and holding back every
  other request of this client for that long: the limit is shared);
- 5xx, 408 and 409, timeouts and dropped connections;
- a 200 whose body does not parse, has no choices, or whose message content is null;

with exponential backoff and jitter. 429 `insufficient_quota` and other 4xx are not retried.
At most `concurrency` requests are in flight at once.

The key stays with its owner (`api_key_for`): `OPENAI_API_KEY` goes only to OpenAI's own API
(https://api.openai.com, the default base URL); any other server gets the key of the variable
the user named (`api_key_env`) or a placeholder that is no secret. A key is read from the
environment only and never printed, logged or stored: it travels in the Authorization header
and nowhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import os
import random
import re
import time
from collections import Counter
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlparse

from sara_megatron.tool_errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_API_HOST = "api.openai.com"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
# Sent to a server other than OpenAI's when the user named no key for it: the client library
# insists on some key, and self-hosted servers (vLLM's docs use the same word) do not check it.
PLACEHOLDER_API_KEY = "EMPTY"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# OpenAI's reasoning models (GPT-5 family, o-series) accept only the default temperature/top_p
# and take `max_completion_tokens` and `reasoning_effort`.
_REASONING_MODEL = re.compile(r"^(?:[\w.-]+/)?(?:gpt-5|o1|o3|o4)(?:$|[-.:])")


def is_reasoning_model(model: str) -> bool:
    """Whether a model is one of OpenAI's reasoning models (GPT-5 family, o-series).

    Args:
        model: The model name, with or without a `provider/` prefix.

    Returns:
        True for a name such as `gpt-5-mini`, `o3` or `openai/o4-mini`.
    """
    return bool(_REASONING_MODEL.match(model))


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """The request settings of a chat completion (besides the messages).

    Attributes:
        model: The model name the server knows.
        temperature, top_p: Sampling; None leaves the server's default (reasoning models
            accept only that).
        max_tokens: Completion token limit (sent as `max_completion_tokens` to reasoning models).
        seed: The request's seed.
        reasoning_effort: For reasoning models ("minimal", "low", "medium", "high").
        extra_body: Fields merged into the request body (e.g. vLLM's `chat_template_kwargs`).

    Raises:
        ValueError: temperature or top_p for a reasoning model, or max_tokens below 1.
    """

    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    reasoning_effort: str | None = None
    extra_body: dict | None = None

    def __post_init__(self):
        if is_reasoning_model(self.model) and (self.temperature is not None or self.top_p is not None):
            raise InputError(f"{self.model} is a reasoning model (GPT-5 family / o-series): it accepts "
                             "only the default temperature and top_p; set reasoning_effort instead")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def request_kwargs(self) -> dict:
        """The request's parameters besides `messages`.

        Returns:
            The keyword arguments of `client.chat.completions.create` (`extra_body` as a dict).
        """
        kwargs: dict[str, Any] = {"model": self.model}
        if is_reasoning_model(self.model):
            if self.max_tokens is not None:
                kwargs["max_completion_tokens"] = self.max_tokens
        else:
            for name in ("temperature", "top_p", "max_tokens"):
                if getattr(self, name) is not None:
                    kwargs[name] = getattr(self, name)
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        return kwargs

    def as_dict(self) -> dict:
        """Every field, for cache keys and run records.

        Returns:
            field name -> value.
        """
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """One chat completion.

    Attributes:
        content: The assistant message's text.
        finish_reason: "stop", "length", ... ("stop" when the server sent none).
        prompt_tokens, completion_tokens: From the reply's usage (0 when absent).
        attempts: HTTP requests it took (1 without a retry).
    """

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class ChatRequestFailed(RuntimeError):
    """Retries exhausted, or an error no retry can fix. `reason` names the last failure
    (`rate_limit`, `server_error`, `timeout`, `connection`, `unparsable_body`, `no_choices`,
    `null_content`, `http_<status>`, `insufficient_quota`); `attempts` counts the requests sent.

    Args:
        reason: The last failure's name (above).
        attempts: Requests sent.
        detail: More about it (an HTTP status, an exception's class), shown in the message.
    """

    def __init__(self, reason: str, attempts: int, detail: str = ""):
        super().__init__(f"request failed after {attempts} attempt(s): {reason}"
                         + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.attempts = attempts


@dataclasses.dataclass
class ChatStats:
    """Live counters of one client. `requests` counts HTTP attempts, `retries` the attempts after a
    first (by reason in `retry_reasons`), `failures` the calls that raised ChatRequestFailed."""

    requests: int = 0
    succeeded: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = dataclasses.field(default_factory=Counter)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.detail = detail


class _Fatal(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def is_openai_api(base_url: str | None) -> bool:
    """Whether a base URL is OpenAI's own API.

    Args:
        base_url: The endpoint; None means OpenAI's.

    Returns:
        True for https, the host api.openai.com and the standard port. Anything else, a
        look-alike host or plain http included, is another server.
    """
    if base_url is None:
        return True
    try:
        url = urlparse(base_url)
        port = url.port
    except ValueError:  # an unreadable port
        return False
    return (url.scheme == "https" and (url.hostname or "") == OPENAI_API_HOST
            and port in (None, 443))


def check_api_key_env(base_url: str | None, api_key_env: str | None) -> None:
    """Refuse an `--api-key-env` value a tool cannot use, without repeating it (a key pasted
    there by mistake must not reach the terminal).

    Args:
        base_url: The endpoint (None: OpenAI's).
        api_key_env: The value of `--api-key-env`, or None.

    Raises:
        ValueError: Not a variable name, or OPENAI_API_KEY named for a server other than
            OpenAI's.
    """
    if api_key_env is None:
        return
    if not _ENV_NAME.match(api_key_env):
        raise InputError("--api-key-env takes the name of an environment variable (letters, "
                         "digits and _), never the key itself")
    if api_key_env == OPENAI_KEY_ENV and not is_openai_api(base_url):
        raise InputError(f"--api-key-env {OPENAI_KEY_ENV}: that key is sent only to OpenAI's API "
                         f"({OPENAI_BASE_URL}); put the key for {base_url} in a variable of "
                         "another name and name that one")


def api_key_for(base_url: str | None, api_key_env: str | None = None) -> str:
    """The key to send to a server.

    Args:
        base_url: The endpoint (None: OpenAI's).
        api_key_env: The variable the user named for the key, or None.

    Returns:
        - a variable named by `api_key_env` (other than OPENAI_API_KEY): its value, for any server;
    - otherwise OpenAI's own API (`is_openai_api`): OPENAI_API_KEY, which must be set;
    - otherwise: PLACEHOLDER_API_KEY. OPENAI_API_KEY is never sent to another server, even when
      named (a caller's default of "OPENAI_API_KEY" must not leak it to a self-hosted one).

    Raises:
        InputError: The key is required and absent (a ValueError); the message names the
            variable only.
    """
    if api_key_env is not None and api_key_env != OPENAI_KEY_ENV:
        key = os.environ.get(api_key_env)
        if not key:
            raise InputError("no API key: the variable named by --api-key-env is not set in the "
                             "environment (or is empty)")
        return key
    if not is_openai_api(base_url):
        return PLACEHOLDER_API_KEY
    key = os.environ.get(OPENAI_KEY_ENV)
    if not key:
        raise InputError(f"no API key: set {OPENAI_KEY_ENV} in the environment for OpenAI's API "
                         "(or give the base URL of a self-hosted server)")
    return key


def parse_retry_after(headers) -> float | None:
    """How long a 429 or 503 asks to wait.

    Args:
        headers: The response headers (a mapping with `get`).

    Returns:
        Seconds (>= 0) from `retry-after-ms`, else `retry-after` (seconds or an HTTP date);
        None when absent or unreadable.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _classify(exc: BaseException) -> Exception:
    """Map what the openai library raised to _Retryable / _Fatal; anything else propagates."""
    import openai
    import pydantic

    if isinstance(exc, openai.RateLimitError):
        code = getattr(exc, "code", None)
        if code == "insufficient_quota":  # a 429 that no waiting fixes
            return _Fatal("insufficient_quota", str(exc))
        return _Retryable("rate_limit", parse_retry_after(exc.response.headers))
    if isinstance(exc, openai.APITimeoutError):  # a subclass of APIConnectionError: first
        return _Retryable("timeout")
    if isinstance(exc, openai.APIConnectionError):
        return _Retryable("connection", detail=type(exc.__cause__ or exc).__name__)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500 or status in (408, 409):
            return _Retryable("server_error", parse_retry_after(exc.response.headers), f"HTTP {status}")
        return _Fatal(f"http_{status}", exc.message)
    if isinstance(exc, (json.JSONDecodeError, pydantic.ValidationError,
                        openai.APIResponseValidationError, UnicodeDecodeError)):
        return _Retryable("unparsable_body", detail=type(exc).__name__)
    return exc


class ChatClient:
    """Bounded, retrying chat completions (see the module docstring). Use within one event loop;
    `await client.aclose()` at the end (or `async with`).

    Args:
        base_url: The endpoint (None: OpenAI's).
        api_key_env: The variable holding the key for `base_url` (`api_key_for`).
        concurrency: Requests in flight at most (>= 1).
        max_retries: Further attempts after the first (>= 0).
        timeout_s: Per request.
        backoff_base_s, backoff_max_s: The exponential backoff's first and largest ceiling.

    Raises:
        ValueError: concurrency < 1, max_retries < 0, or no key where one is required.
    """

    def __init__(self, base_url: str | None, *, api_key_env: str | None = None,
                 concurrency: int = 16, max_retries: int = 6, timeout_s: float = 600.0,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 60.0):
        import openai

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        api_key = api_key_for(base_url, api_key_env)
        self.base_url = base_url or OPENAI_BASE_URL
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stats = ChatStats()
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url,
                                          max_retries=0, timeout=timeout_s)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._paused_until = 0.0  # monotonic time before which no request starts (Retry-After)

    def __repr__(self) -> str:  # never the key
        return f"ChatClient(base_url={self.base_url!r}, concurrency={self.concurrency})"

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- chat completions -------------------------------------------------------------------------

    async def complete(self, messages: list[dict], settings: ChatSettings) -> ChatReply:
        """One chat completion, retried as the module docstring says.

        Args:
            messages: The chat, `[{"role": ..., "content": ...}, ...]`.
            settings: The request's `ChatSettings`.

        Returns:
            The `ChatReply`.

        Raises:
            ChatRequestFailed: Retries exhausted, or an error no retry fixes.
        """
        kwargs = settings.request_kwargs()
        body = {"messages": messages, **{k: v for k, v in kwargs.items() if k != "extra_body"}}
        body.update(kwargs.get("extra_body") or {})

        async def send():
            # The client's plain POST, as `chat.completions.create` sends it, minus that method's
            # type-driven transform of the parameters and model building of the reply: together
            # they cost more CPU per request than everything else here (benchmarks/bench_chat_client.py).
            data = await self._client.post("/chat/completions", body=body, cast_to=object)
            if not isinstance(data, dict):  # a body of another content type comes back as text
                raise _Retryable("unparsable_body", detail="not a JSON object")
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise _Retryable("no_choices")
            message = choices[0].get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise _Retryable("null_content")
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            return (content, choices[0].get("finish_reason") or "stop",
                    int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

        (content, finish_reason, prompt_tokens, completion_tokens), attempts = \
            await self._with_retries(send)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        return ChatReply(content, finish_reason, prompt_tokens, completion_tokens, attempts)

    # -- Batch API (files + batches), for --batch runs ----------------------------------------------

    async def upload_batch_file(self, data: bytes, filename: str = "requests.jsonl") -> str:
        """Upload a Batch API request file.

        Args:
            data: The JSONL bytes, one request a line.
            filename: The name it is uploaded under.

        Returns:
            The file id.

        Raises:
            ChatRequestFailed: As `complete`.
        """
        async def send():
            return (await self._client.files.create(file=(filename, data), purpose="batch")).id
        return (await self._with_retries(send))[0]

    async def create_batch(self, input_file_id: str, metadata: dict | None = None) -> str:
        """Create a chat-completions batch (24 h window) from an uploaded file.

        Args:
            input_file_id: From `upload_batch_file`.
            metadata: Stored with the batch.

        Returns:
            The batch id.

        Raises:
            ChatRequestFailed: As `complete`.
        """
        async def send():
            batch = await self._client.batches.create(
                input_file_id=input_file_id, endpoint="/v1/chat/completions",
                completion_window="24h", metadata=metadata)
            return batch.id
        return (await self._with_retries(send))[0]

    async def retrieve_batch(self, batch_id: str):
        """A batch's current state.

        Args:
            batch_id: From `create_batch`.

        Returns:
            The openai library's `Batch` (status, request_counts, output and error file ids).

        Raises:
            ChatRequestFailed: As `complete`.
        """
        async def send():
            return await self._client.batches.retrieve(batch_id)
        return (await self._with_retries(send))[0]

    async def file_text(self, file_id: str) -> str:
        """A file's content (a batch's output or error file).

        Args:
            file_id: The file's id.

        Returns:
            Its text.

        Raises:
            ChatRequestFailed: As `complete`.
        """
        async def send():
            return (await self._client.files.content(file_id)).text
        return (await self._with_retries(send))[0]

    # -- the retry loop -----------------------------------------------------------------------------

    async def _with_retries(self, send: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        attempt = 0
        while True:
            attempt += 1
            async with self._semaphore:
                await self._wait_for_pause()
                self.stats.requests += 1
                try:
                    result = await send()
                except (_Retryable, _Fatal) as e:
                    outcome = e
                except Exception as e:  # noqa: BLE001 — classified, or re-raised as it is
                    outcome = _classify(e)
                    if outcome is e:
                        raise
                else:
                    self.stats.succeeded += 1
                    return result, attempt
                if isinstance(outcome, _Retryable) and outcome.retry_after_s is not None:
                    # The limit is shared: every request of this client waits that long, set
                    # before this slot is released so that no waiting request slips through.
                    self._paused_until = max(self._paused_until,
                                             time.monotonic() + outcome.retry_after_s)
            if isinstance(outcome, _Fatal) or attempt > self.max_retries:
                self.stats.failures += 1
                raise ChatRequestFailed(outcome.reason, attempt, outcome.detail)
            self.stats.retries += 1
            self.stats.retry_reasons[outcome.reason] += 1
            delay = self._delay(attempt, outcome.retry_after_s)
            log.info("retrying after %s (attempt %d, waiting %.2fs)", outcome.reason, attempt, delay)
            await asyncio.sleep(delay)

    def _delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            # The server said how long; a little jitter on top so the held-back requests do not
            # all return in the same instant.
            return retry_after_s + random.uniform(0.0, min(0.1 * retry_after_s, 1.0))
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter"

    async def _wait_for_pause(self) -> None:
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
