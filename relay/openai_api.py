"""The OpenAI-compatible endpoint: ``POST /v1/chat/completions`` and ``GET /v1/models``.

For clients that already speak OpenAI (the official SDKs, LangChain, curl scripts): point
their base URL at the relay and the relay's key does the paying.  Unlike ``/chat`` there is no
event log, no replay and no resume: one request, one upstream connection, passed through.

Decisions (DESIGN.md, "Errors and status codes"):

1. Real status codes where possible.  SDKs map statuses to exceptions and retry 429/5xx, so
   the response headers are held until the upstream answers: an upstream error then comes
   back with the upstream's status, OpenAI's error JSON and its ``retry-after``,
   ``retry-after-ms`` and ``x-request-id`` headers.  An upstream 401/403 is the relay's own
   credentials failing: 502, and never the upstream's text (OpenAI's 401 quotes the key).
2. If the first keepalive falls due before the upstream has answered, the relay commits to
   200 (a proxy would otherwise cut a reasoning model's long silence) and a later error
   travels in-stream as ``data: {"error": {...}}``, which the SDKs raise as ``APIError``.
3. Chunks go out as the upstream sent them (the same JSON data string), then ``data: [DONE]``
   once the upstream finished.  A failure mid-answer is an in-stream error object and the end:
   never a synthesized ``finish_reason`` or ``[DONE]``.
4. The relay asks for ``stream_options.include_usage`` so its log line has token counts, and
   drops that usage chunk again for a client that did not ask for it.
5. A client that goes away cancels the handler (handler cancellation is on), which closes the
   upstream response at once: closing, not draining, is what stops the billing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any, Final

from aiohttp import web

from relay.access import identity
from relay.accounting import log_finished
from relay.config import Config
from relay.errors import error_response, read_json
from relay.keys import CONFIG, REGISTRY, UPSTREAM
from relay.openai_params import CompletionsRequest, completions_request
from relay.ratelimit import LIMITS, TooManyStreams
from relay.response import KEEPALIVE, EventStream, SlowClient
from relay.sse import encode
from relay.streams import new_stream_id
from relay.upstream import UpstreamError, UpstreamResponse
from relay.validation import BadRequest, Limits

log = logging.getLogger("relay.openai")

DONE: Final = encode("[DONE]")


class Live:
    """The /v1 requests in flight: counted against --max-streams, cancelled at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False

    def cancel_all(self) -> None:
        self.shutting_down = True
        for task in self.tasks:
            task.cancel()


LIVE = web.AppKey("openai_live", Live)


async def cancel_live(app: web.Application) -> None:
    """on_shutdown: each running /v1 stream ends with an in-stream ``shutdown`` error."""
    app[LIVE].cancel_all()


class Record:
    """What the one log line per finished request says."""

    def __init__(self, model: str) -> None:
        self.id = new_stream_id()
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.first_delta: float | None = None
        self.deltas = 0
        self.bytes = 0
        self.outcome = "cancelled"
        self.usage: dict[str, Any] | None = None

    def log(self) -> None:
        log_finished(log, "v1", self.id, self.model, self.outcome, started=self.started,
                     first_delta=self.first_delta, now=self.loop.time(), deltas=self.deltas,
                     nbytes=self.bytes, usage=self.usage)


def _error_body(exc: UpstreamError, status: int | None) -> dict[str, Any]:
    if exc.body is not None and status not in (401, 403):
        return exc.body
    return {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}}


def upstream_error_response(exc: UpstreamError) -> web.Response:
    """An upstream failure before the first byte, as the status and body an OpenAI SDK expects."""
    status = exc.status
    if status in (401, 403):
        # upstream.py already replaced the upstream's text with one about the relay's credentials.
        body = {"error": {"message": exc.message, "type": "server_error", "param": None,
                          "code": "upstream_auth_failed"}}
        status = 502
    elif status is not None and 400 <= status < 600:
        body = _error_body(exc, status)
    else:
        status = 504 if exc.code == "upstream_timeout" else 502
        body = _error_body(exc, None)
    headers = {name: value for name, value in (("retry-after", exc.retry_after),
                                                ("retry-after-ms", exc.retry_after_ms),
                                                ("x-request-id", exc.request_id)) if value}
    return web.json_response(body, status=status, headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    registry = request.app[REGISTRY]
    live = request.app[LIVE]
    try:
        req = completions_request(await read_json(request), default_model=registry.default_model,
                                  models=config.models, stream_usage=config.stream_usage,
                                  limits=Limits.of(config))
    except BadRequest as exc:
        return error_response(exc.status, exc.message, param=exc.param)
    if registry.live + len(live.tasks) >= config.max_streams:
        return error_response(503, f"the relay is at its limit of {config.max_streams} live streams; try again shortly",
                      headers={"Retry-After": "5"})
    try:
        release = request.app[LIMITS].streams.acquire(identity(request))
    except TooManyStreams as exc:
        # 429: the SDKs raise RateLimitError (and wait Retry-After before their own retries).
        return error_response(429, str(exc), code="rate_limit_exceeded", type_="requests", headers={"Retry-After": "5"})
    try:
        return await _run(request, req, live)
    finally:
        release()


async def _run(request: web.Request, req: CompletionsRequest, live: Live) -> web.StreamResponse:
    task = asyncio.current_task()
    assert task is not None
    live.tasks.add(task)
    record = Record(req.model)
    try:
        if req.stream:
            return await _stream(request, req, record)
        return await _complete(request, req, record)
    except asyncio.CancelledError:
        record.outcome = "shutdown" if live.shutting_down else "cancelled"
        raise
    finally:
        live.tasks.discard(task)
        record.log()


async def _complete(request: web.Request, req: CompletionsRequest, record: Record) -> web.StreamResponse:
    """Non-streaming: the upstream's own JSON answer, passed through as sent."""
    try:
        answer = await request.app[UPSTREAM].complete(req.body)
    except UpstreamError as exc:
        record.outcome = exc.code
        return upstream_error_response(exc)
    record.outcome = "done"
    record.first_delta = record.loop.time()
    record.deltas = len(answer.obj.get("choices") or ())
    record.bytes = len(answer.raw)
    usage = answer.obj.get("usage")
    record.usage = usage if isinstance(usage, dict) else None
    headers = {"x-request-id": answer.request_id} if answer.request_id else None
    return web.Response(body=answer.raw, content_type="application/json", headers=headers)


def _close_unclaimed(task: asyncio.Task[UpstreamResponse]) -> None:
    # An open that finished after nobody wanted it: close the response, retrieve the error.
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def _stream(request: web.Request, req: CompletionsRequest, record: Record) -> web.StreamResponse:
    config = request.app[CONFIG]
    opening = asyncio.create_task(request.app[UPSTREAM].open(req.body))
    upstream: UpstreamResponse | None = None
    out: EventStream | None = None
    try:
        done, _ = await asyncio.wait({opening}, timeout=config.keepalive)
        if not done:
            # The first keepalive is due and the upstream has not answered: commit to 200 so
            # proxies and clients keep the connection; from here errors go in-stream.
            out = await _commit(request, config, None)
            await out.send_bytes(KEEPALIVE)
        try:
            upstream = await opening
        except UpstreamError as exc:
            record.outcome = exc.code
            if out is None:
                return upstream_error_response(exc)
            await _send_error(out, exc)
            return out
        if out is None:
            out = await _commit(request, config, upstream.request_id)
        await _pump(out, upstream, req, record, config)
    except (ConnectionResetError, SlowClient):
        record.outcome = "cancelled"
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not (request.app[LIVE].shutting_down and task is not None and task.uncancel() == 0):
            raise
        # Only our own shutdown cancel (Live.cancel_all) is handled: the client gets an answer it
        # can act on and a cleanly ended response instead of a cut connection.
        record.outcome = "shutdown"
        message = "the relay is shutting down; retry the request"
        if out is None:
            return error_response(503, message, code="shutdown", headers={"Retry-After": "1"})
        with suppress(ConnectionResetError, SlowClient):
            await out.send_bytes(encode(json.dumps({"error": {
                "message": message, "type": "server_error", "param": None, "code": "shutdown"}})))
    finally:
        if upstream is not None:
            upstream.close()
        else:
            opening.cancel()
            opening.add_done_callback(_close_unclaimed)
        if out is not None and out.prepared:
            out.stop_streaming()
    if out is None or not out.prepared:
        return web.Response(status=499)  # the client left before the headers went out; nobody reads this
    await out.wait()
    return out


async def _commit(request: web.Request, config: Config, request_id: str | None) -> EventStream:
    out = EventStream(keepalive=config.keepalive, send_timeout=config.send_timeout,
                      send_buffer=config.send_buffer,
                      headers={"x-request-id": request_id} if request_id else None)
    await out.prepare(request)
    return out


async def _pump(out: EventStream, upstream: UpstreamResponse, req: CompletionsRequest, record: Record,
                config: Config) -> None:
    # Only the usage chunk the relay itself asked for is removed.
    drop_usage = config.stream_usage and not req.client_usage
    try:
        while chunks := await upstream.read():
            parts = []
            for chunk in chunks:
                if drop_usage and not chunk.obj.get("choices") and chunk.obj.get("usage"):
                    continue
                if _has_delta(chunk.obj):
                    if record.first_delta is None:
                        record.first_delta = record.loop.time()
                    record.deltas += 1
                parts.append(encode(chunk.data))
            if parts:
                data = b"".join(parts)
                await out.send_bytes(data)
                record.bytes += len(data)
    except UpstreamError as exc:
        record.outcome = exc.code
        record.usage = upstream.usage
        await _send_error(out, exc)
        return
    record.usage = upstream.usage
    await out.send_bytes(DONE)
    record.bytes += len(DONE)
    record.outcome = "done"


async def _send_error(out: EventStream, exc: UpstreamError) -> None:
    body = _error_body(exc, exc.status)
    await out.send_bytes(encode(json.dumps(body, ensure_ascii=False)))


def _has_delta(obj: dict[str, Any]) -> bool:
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("reasoning")
                                        or delta.get("reasoning_content")):
            return True
    return False


def _model_ids(request: web.Request) -> tuple[str, ...]:
    config = request.app[CONFIG]
    default = request.app[REGISTRY].default_model
    return config.models or ((default,) if default else ())


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "relay"}


async def list_models(request: web.Request) -> web.Response:
    """The models this relay allows: the allowlist, else the default model."""
    return web.json_response({"object": "list", "data": [_model(m) for m in _model_ids(request)]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in _model_ids(request):
        return error_response(404, f"The model '{name}' does not exist or is not available on this relay",
                      param="model", code="model_not_found")
    return web.json_response(_model(name))
