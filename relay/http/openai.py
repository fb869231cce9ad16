"""The OpenAI-compatible view: ``POST /v1/chat/completions`` and ``GET /v1/models``.

For clients that already speak OpenAI (the official SDKs, LangChain, curl scripts): point
their base URL at the relay and the relay's key does the paying.  Each request is a generation
in the one registry (counted, capped, drained and logged like a ``/chat`` one), but keeps the
OpenAI wire's semantics: no resume, no grace (a client that leaves stops the upstream at once),
nothing kept once it is over.

Decisions (docs/architecture.md, "Errors and status codes"):

1. Real status codes where possible.  SDKs map statuses to exceptions and retry 429/5xx, so
   the response headers are held until the upstream answers: an upstream error then comes
   back with the upstream's status, OpenAI's error JSON and its ``retry-after``,
   ``retry-after-ms`` and ``x-request-id`` headers.  An upstream 401/403 is the relay's own
   credentials failing: 502, and never the upstream's text (OpenAI's 401 quotes the key).
2. If the first keepalive falls due before the upstream has answered, the relay commits to
   200 (a proxy would otherwise cut a reasoning model's long silence) and a later error
   travels in-stream as ``data: {"error": {...}}``, which the SDKs raise as ``APIError``.
3. Chunks go out as the upstream sent them (relay/http/openai_wire.py), then ``data: [DONE]``
   once the upstream finished.  A failure mid-answer is an in-stream error object and the end:
   never a synthesized ``finish_reason`` or ``[DONE]``.
4. The relay asks for ``stream_options.include_usage`` so its log line has token counts, and
   drops that usage chunk again for a client that did not ask for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from relay.config import Config
from relay.core.fanout import Subscriber
from relay.core.generation import Generation
from relay.http.admission import Refused, refusal, start_generation
from relay.http.appkeys import CATALOG, CONFIG
from relay.http.body import BadRequest, read_json
from relay.http.errors import error_response, json_response, request_refusal
from relay.http.fields import FieldPolicy
from relay.http.openai_body import completions_request
from relay.http.openai_wire import OpenAIWire, failure_response
from relay.http.params import RequestBounds
from relay.http.sse_response import KEEPALIVE, EventStream, SlowClient, event_stream, follow
from relay.jsoncodec import dumps
from relay.sse import encode

log = logging.getLogger("relay.http")

LAGGED: Final = encode(dumps({"error": {
    "message": "the client read the stream too slowly and fell behind what the relay keeps",
    "type": "server_error", "param": None, "code": "client_too_slow"}}))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    catalog = request.app[CATALOG]
    try:
        req = completions_request(await read_json(request), default_model=catalog.default_model,
                                  models=catalog.allowed, stream_usage=config.stream_usage,
                                  limits=RequestBounds.of(config), policy=field_policy(config, catalog.allowed))
        wire = OpenAIWire(drop_usage=config.stream_usage and not req.client_usage)
        gen = await start_generation(request, kind="v1", model=req.model, body=req.body, wire=wire,
                               resumable=False, streaming=req.stream)
    except BadRequest as exc:
        return error_response(exc.status, exc.message, param=exc.param, refusal=request_refusal(exc.status))
    except Refused as exc:
        return refusal(exc)
    stream = req.stream
    del req  # its body: not held by this frame for the whole answer
    # Attached before anything can wait: a client that leaves from here on detaches, and a
    # generation without a grace is cancelled the moment its last client has gone.
    sub = gen.attach(0)
    if stream:
        return await send_stream(request, config, gen, sub)
    return await send_completion(gen, sub)


def field_policy(config: Config, allowed: tuple[str, ...]) -> FieldPolicy:
    return FieldPolicy.of(strict=config.strict_fields, refused=config.refuse_fields, allowlist=bool(allowed),
                          max_n=True, max_output_tokens=config.max_output_tokens is not None)


async def _answered(gen: Generation, sub: Subscriber) -> None:
    while not gen.opened and not gen.finished:
        await gen.changed(sub)


async def send_completion(gen: Generation, sub: Subscriber) -> web.StreamResponse:
    """Non-streaming: the upstream's own JSON answer, passed through as sent (chat completions and
    the Responses API alike)."""
    try:
        while not gen.finished:
            await gen.changed(sub)
    finally:
        gen.detach(sub)
    assert gen.ending is not None
    if gen.completion is None:
        return failure_response(gen.ending)
    headers = {"x-request-id": gen.completion.request_id} if gen.completion.request_id else {}
    if len(gen.attempts) > 1:
        headers["x-relay-attempts"] = str(len(gen.attempts))
    return web.Response(body=gen.completion.raw, content_type="application/json", headers=headers or None)


async def send_stream(request: web.Request, config: Config, gen: Generation, sub: Subscriber, *,
                        lagged: Callable[[Generation], bytes] = lambda _gen: LAGGED) -> web.StreamResponse:
    """Streaming, with the status line held until the upstream answers (or the first keepalive is
    due): chat completions and the Responses API alike; ``lagged`` ends a reader that fell behind."""
    out: EventStream | None = None
    try:
        try:
            await asyncio.wait_for(_answered(gen, sub), timeout=config.keepalive)
        except TimeoutError:
            # The first keepalive is due and the upstream has not answered: commit to 200 so
            # proxies and clients keep the connection; from here errors go in-stream.
            out = await _commit(request, config, None, 0)
            await out.send_bytes(KEEPALIVE)
            await _answered(gen, sub)
        if out is None:
            if not gen.opened:
                assert gen.ending is not None
                return failure_response(gen.ending)
            out = await _commit(request, config, gen.request_id, len(gen.attempts))
        sub.sink = out.try_send
        if not await follow(out, gen, sub):
            # Four replay logs behind: what it missed is gone, so it gets an honest end, never a gap.
            log.warning("v1 %s: the client fell too far behind the stream; ended", gen.id)
            await out.send_bytes(lagged(gen))
    except ConnectionResetError:
        pass
    except SlowClient as exc:
        log.warning("v1 %s: %s (bound %d)", gen.id, exc, config.send_buffer)
    finally:
        # First: a client that has gone stops the upstream now, not after the response's own
        # wind-down below (which takes a loop iteration or more).
        gen.detach(sub)
        if out is not None and out.prepared:
            out.stop_streaming()
    if out is None or not out.prepared:
        return web.Response(status=499)  # the client left before the headers went out; nobody reads this
    return out


async def _commit(request: web.Request, config: Config, request_id: str | None, attempts: int) -> EventStream:
    headers = {"x-request-id": request_id} if request_id else {}
    if attempts > 1:
        headers["x-relay-attempts"] = str(attempts)  # it failed over before the first byte
    out = event_stream(request, headers or None)
    await out.prepare(request)
    return out


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "relay"}


async def list_models(request: web.Request) -> web.Response:
    """The models this relay serves (relay/upstream/catalog.py), the default first.

    ``X-Relay-Default-Model`` names the default (empty: every request must name a model), so the
    page knows whether to ask for one, and ``X-Relay-Demo: 1`` says the built-in demo model answers,
    so it can say so before the first answer; the body stays OpenAI's shape.
    """
    catalog = request.app[CATALOG]
    headers = {"X-Relay-Default-Model": catalog.default_model or ""}
    if catalog.demo:
        headers["X-Relay-Demo"] = "1"
    return json_response({"object": "list", "data": [_model(m) for m in await catalog.listed()]}, headers=headers)


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in await request.app[CATALOG].listed():
        return error_response(404, f"The model '{name}' does not exist or is not available on this relay",
                              param="model", code="model_not_found")
    return json_response(_model(name))
