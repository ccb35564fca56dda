"""A real OpenAI-compatible HTTP server on 127.0.0.1 (aiohttp, in a background thread).

The test double for everything that talks to a model, and the host of the demo's rule-based
translator. It serves

- `POST /v1/chat/completions`: the assistant content comes from `responder(request_body)`;
- `POST /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches`,
  `GET /v1/batches/{id}`: enough of the Batch API for a submit / poll / download round trip
  (a batch completes `batch_delay_s` after it was created, each line answered by the responder);

and injects faults by request index (0-based, over every chat request received, batch lines
included): a 429 with `Retry-After`, a 5xx, a dropped connection, a 200 with an unparsable body,
a 200 without choices or with null content, a slow reply, or a given reply (wrong script, lost
`\\boxed{}`, truncated...). Every request is recorded with its body, headers and outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
import time
from typing import Callable, Sequence

from aiohttp import web


@dataclasses.dataclass(frozen=True)
class ServerReply:
    """What the responder answers: the assistant content and the finish reason."""

    content: str
    finish_reason: str = "stop"


@dataclasses.dataclass(frozen=True)
class Fault:
    """What the server does instead of (or to) a normal reply. `name` is the recorded outcome."""

    name: str
    retry_after_s: float | None = None
    status: int = 500
    content: str | None = None
    finish_reason: str = "stop"
    delay_s: float = 0.0

    @classmethod
    def rate_limit(cls, retry_after_s: float = 1.0) -> "Fault":
        """A 429 asking to wait.

        Args:
            retry_after_s: The `Retry-After` header's seconds.

        Returns:
            The fault.
        """
        return cls("rate_limit", retry_after_s=retry_after_s, status=429)

    @classmethod
    def server_error(cls, status: int = 500) -> "Fault":
        """An error status (any: 5xx, or a 4xx such as 401).

        Args:
            status: The HTTP status sent.

        Returns:
            The fault.
        """
        return cls("server_error", status=status)

    @classmethod
    def drop_connection(cls) -> "Fault":
        """A fault that closes the socket without any response."""
        return cls("drop_connection")

    @classmethod
    def garbage_body(cls) -> "Fault":
        """A 200 whose JSON body is cut short."""
        return cls("garbage_body")

    @classmethod
    def no_choices(cls) -> "Fault":
        """A 200 completion with an empty `choices` list."""
        return cls("no_choices")

    @classmethod
    def null_content(cls) -> "Fault":
        """A 200 completion whose message content is null."""
        return cls("null_content")

    @classmethod
    def slow(cls, delay_s: float) -> "Fault":
        """Answer normally, but late.

        Args:
            delay_s: Seconds before the reply (past the client's timeout: a timeout).

        Returns:
            The fault.
        """
        return cls("slow", delay_s=delay_s)

    @classmethod
    def reply(cls, content: str, finish_reason: str = "stop") -> "Fault":
        """A 200 with this content instead of the responder's.

        Args:
            content: The assistant content (a wrong script, a lost box, ...).
            finish_reason: The choice's finish reason (e.g. "length" for a cut reply).

        Returns:
            The fault.
        """
        return cls("reply", content=content, finish_reason=finish_reason)


@dataclasses.dataclass
class RecordedRequest:
    """One request the server received (see the field comments)."""

    index: int              # position among chat requests (batch lines included)
    path: str               # "/v1/chat/completions", or "batch" for a line of a batch
    body: dict | None
    headers: dict
    outcome: str            # "ok" or the fault's name ("responder_error" when the responder raised)
    time: float             # time.time() when it arrived


Responder = Callable[[dict], "str | ServerReply"]
FaultPlan = Callable[[int, dict], "Fault | None"] | Sequence["Fault | None"] | None


def approx_tokens(text: str) -> int:
    """A token count for the usage block.

    Args:
        text: Any text.

    Returns:
        Its UTF-8 bytes / 4, at least 1.
    """
    return max(1, len(text.encode("utf-8")) // 4)


def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class LocalChatServer:
    """`with LocalChatServer(responder) as server: ... server.base_url ...`

    Args:
        responder: request body -> the assistant content (a str or a `ServerReply`).
        faults: By request index (0-based over chat requests and batch lines): a list of
            `Fault` or None, or a function `(index, body) -> Fault | None`.
        latency_s: Added before every chat reply.
        port: 0 picks a free one (`port` holds it once started).
        batch_delay_s: Time from a batch's creation to its completion.

    Attributes:
        requests: Every `RecordedRequest`, in arrival order.
        max_in_flight: The most chat requests in the server at once.
    """

    def __init__(self, responder: Responder, *, faults: FaultPlan = None, latency_s: float = 0.0,
                 port: int = 0, batch_delay_s: float = 0.0):
        self.responder = responder
        self.faults = faults
        self.latency_s = latency_s
        self.batch_delay_s = batch_delay_s
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._counter = itertools.count()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL to give a client (`http://127.0.0.1:<port>/v1`)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> "LocalChatServer":
        """Serve in a background thread; returns once the port is bound.

        Returns:
            self.

        Raises:
            OSError: The port could not be bound.
        """
        started = threading.Event()
        errors: list[BaseException] = []

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_site())
            except BaseException as e:  # noqa: BLE001 — handed to the starting thread
                errors.append(e)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="LocalChatServer", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        return self

    async def _start_site(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/files", self._upload_file)
        app.router.add_get("/v1/files/{file_id}", self._file_meta)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve_batch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> "LocalChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- bookkeeping --------------------------------------------------------------------------------

    def outcomes(self) -> list[str]:
        """The outcome of every request so far ("ok" or a fault's name), in arrival order."""
        with self._lock:
            return [r.outcome for r in self.requests]

    def _record(self, path: str, body: dict | None, headers: dict) -> RecordedRequest:
        with self._lock:
            rec = RecordedRequest(next(self._counter), path, body, headers, "pending", time.time())
            self.requests.append(rec)
        return rec

    def _fault_for(self, index: int, body: dict) -> Fault | None:
        if self.faults is None:
            return None
        if callable(self.faults):
            return self.faults(index, body)
        return self.faults[index] if index < len(self.faults) else None

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids):06d}"

    def _completion(self, index: int, body: dict, content: str | None, finish_reason: str) -> dict:
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        return {
            "id": f"chatcmpl-{index:06d}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "local"),
            "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": approx_tokens(prompt),
                      "completion_tokens": approx_tokens(content or ""),
                      "total_tokens": approx_tokens(prompt) + approx_tokens(content or "")},
        }

    def _answer(self, rec: RecordedRequest, body: dict, fault: Fault | None) -> tuple[int, dict | None, dict]:
        """(status, JSON body or None for the fault kinds that send no JSON, extra headers)."""
        if fault is None or fault.name == "slow":
            try:
                reply = self.responder(body)
            except Exception as e:  # noqa: BLE001 — a responder bug becomes a 500, recorded
                rec.outcome = "responder_error"
                return 500, _error_body(f"responder raised {type(e).__name__}: {e}", "server_error"), {}
            if isinstance(reply, str):
                reply = ServerReply(reply)
            rec.outcome = "ok" if fault is None else fault.name
            return 200, self._completion(rec.index, body, reply.content, reply.finish_reason), {}
        rec.outcome = fault.name
        if fault.name == "rate_limit":
            return 429, _error_body("Rate limit reached; try again later.", "requests",
                                    "rate_limit_exceeded"), {"Retry-After": f"{fault.retry_after_s:g}"}
        if fault.name == "server_error":
            return fault.status, _error_body("The server had an error.", "server_error"), {}
        if fault.name == "no_choices":
            completion = self._completion(rec.index, body, "", "stop")
            completion["choices"] = []
            return 200, completion, {}
        if fault.name == "null_content":
            return 200, self._completion(rec.index, body, None, "stop"), {}
        if fault.name == "reply":
            return 200, self._completion(rec.index, body, fault.content, fault.finish_reason), {}
        return 200, None, {}  # drop_connection / garbage_body: the caller handles them

    # -- chat completions ---------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response(_error_body("body is not JSON", "invalid_request_error"), status=400)
        rec = self._record(request.path, body, dict(request.headers))
        fault = self._fault_for(rec.index, body)
        if fault is not None:
            rec.outcome = fault.name  # known now: a slow reply may be cancelled by the client
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.latency_s + (fault.delay_s if fault is not None else 0.0)
            if delay:
                await asyncio.sleep(delay)
            status, payload, headers = self._answer(rec, body, fault)
            if fault is not None and fault.name == "drop_connection":
                # Close the socket with no response at all: the client sees the connection drop.
                request.transport.abort()
                raise asyncio.CancelledError
            if fault is not None and fault.name == "garbage_body":
                return web.Response(status=200, body=b'{"id": "chatcmpl-x", "choices": [{"mess',
                                    content_type="application/json")
            return web.json_response(payload, status=status, headers=headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    # -- Batch API ----------------------------------------------------------------------------------

    async def _upload_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return web.json_response(_error_body("no file part", "invalid_request_error"), status=400)
        data = upload.file.read()
        file_id = self._new_id("file")
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": upload.filename or "upload.jsonl", "purpose": str(form.get("purpose", "batch")),
                "status": "processed"}
        self.files[file_id] = {"meta": meta, "data": data}
        return web.json_response(meta)

    async def _file_meta(self, request: web.Request) -> web.Response:
        entry = self.files.get(request.match_info["file_id"])
        if entry is None:
            return web.json_response(_error_body("no such file", "invalid_request_error"), status=404)
        return web.json_response(entry["meta"])

    async def _file_content(self, request: web.Request) -> web.Response:
        entry = self.files.get(request.match_info["file_id"])
        if entry is None:
            return web.json_response(_error_body("no such file", "invalid_request_error"), status=404)
        return web.Response(body=entry["data"], content_type="application/octet-stream")

    async def _create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        input_file_id = body.get("input_file_id")
        if input_file_id not in self.files:
            return web.json_response(_error_body("no such input file", "invalid_request_error"), status=400)
        batch_id = self._new_id("batch")
        batch = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"),
                 "input_file_id": input_file_id, "completion_window": body.get("completion_window"),
                 "status": "in_progress", "created_at": int(time.time()), "output_file_id": None,
                 "error_file_id": None, "errors": None, "metadata": body.get("metadata"),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        self.batches[batch_id] = batch
        asyncio.get_running_loop().create_task(self._run_batch(batch, dict(request.headers)))
        return web.json_response(batch)

    async def _retrieve_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(_error_body("no such batch", "invalid_request_error"), status=404)
        return web.json_response(batch)

    async def _run_batch(self, batch: dict, headers: dict) -> None:
        await asyncio.sleep(self.batch_delay_s)
        outputs, errors = [], []
        lines = self.files[batch["input_file_id"]]["data"].decode("utf-8").splitlines()
        for line in filter(str.strip, lines):
            item = json.loads(line)
            body = item.get("body", {})
            rec = self._record("batch", body, headers)
            fault = self._fault_for(rec.index, body)
            status, payload, _ = self._answer(rec, body, fault)
            if payload is None:  # no HTTP response for this line: an error-file entry
                errors.append({"id": self._new_id("batch_req"), "custom_id": item.get("custom_id"),
                               "response": None,
                               "error": {"code": rec.outcome, "message": "request failed"}})
                continue
            outputs.append({"id": self._new_id("batch_req"), "custom_id": item.get("custom_id"),
                            "response": {"status_code": status, "request_id": f"req-{rec.index}",
                                         "body": payload}, "error": None})
        for kind, entries in (("output_file_id", outputs), ("error_file_id", errors)):
            if entries:
                file_id = self._new_id("file")
                data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode()
                self.files[file_id] = {"meta": {"id": file_id, "object": "file", "bytes": len(data),
                                                "created_at": int(time.time()), "filename": f"{kind}.jsonl",
                                                "purpose": "batch_output", "status": "processed"},
                                       "data": data}
                batch[kind] = file_id
        ok = sum(1 for e in outputs if e["response"]["status_code"] == 200)
        batch["request_counts"] = {"total": len(outputs) + len(errors), "completed": ok,
                                   "failed": len(outputs) + len(errors) - ok}
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())
