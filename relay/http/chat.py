"""The ``/chat`` view (docs/architecture.md): validate, negotiate, subscribe, follow.

Every error before the stream is JSON ``{"error": {"message", "type", "param"}}`` with a 4xx or
5xx status; once an event stream has begun (200 at byte zero) errors travel as ``error`` events.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from relay.config import Config
from relay.core.eventlog import ResumeExpired
from relay.core.generation import Generation
from relay.core.store import StoreUnavailable
from relay.core.ids import parse_event_id
from relay.http import access
from relay.http.admission import Refused, refusal, start_generation
from relay.http.appkeys import ACCESS, CATALOG, CONFIG, METRICS, REGISTRY
from relay.http.body import BadRequest, read_json
from relay.http.chat_body import chat_request
from relay.http.chat_wire import RESUME_EXPIRED, ChatWire, interrupted_event, last_event, unavailable_event
from relay.http.errors import error_response, json_response, request_refusal, store_unavailable
from relay.http.params import RequestBounds
from relay.http.sse_response import KEEPALIVE, event_stream, follow, serve_events
from relay.jsoncodec import dumps

log = logging.getLogger("relay.http")

GET_PARAMS = frozenset({"prompt", "model", "lastEventId"})


def _wants_json(request: web.Request) -> bool:
    """True when Accept asks for application/json and not for text/event-stream."""
    types = {part.split(";", 1)[0].strip().lower() for part in request.headers.get("Accept", "").split(",")}
    return "application/json" in types and "text/event-stream" not in types


def _last_event_id(request: web.Request) -> str | None:
    return request.headers.get("Last-Event-ID") or request.query.get("lastEventId") or None


async def _start(request: web.Request, body: Any, *, wait: bool) -> Generation:
    config = request.app[CONFIG]
    catalog = request.app[CATALOG]
    model, upstream_body = chat_request(body, default_model=catalog.default_model,
                                        stream_usage=config.stream_usage, models=catalog.allowed,
                                        limits=RequestBounds.of(config))
    return await start_generation(request, kind="chat", model=model, body=upstream_body, resumable=True,
                            wire=ChatWire(model=model, demo=catalog.demo, retry_ms=config.retry_ms),
                            wait_for_subscriber=config.attach_timeout if wait else None)


def _refusal(exc: Exception) -> web.Response:
    if isinstance(exc, BadRequest):
        return error_response(exc.status, exc.message, param=exc.param, refusal=request_refusal(exc.status))
    return refusal(exc)


async def post_chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json(request)
        if _wants_json(request):
            stream = await _start(request, body, wait=True)
            # Found by id on every instance before the client is told where it is.
            await request.app[REGISTRY].store.ready(stream.id)
            # With tokens, the URL carries a capability for this stream alone (relay/http/access.py),
            # because EventSource cannot send the Authorization header.
            events = request.app[ACCESS].events_url(stream.id, stream.owner)
            return json_response({"id": stream.id, "events": events}, status=201,
                                 headers={"Location": f"/chat/{stream.id}"})
        stream = await _start(request, body, wait=False)
    except (BadRequest, *Refused) as exc:
        return _refusal(exc)
    del body  # not held by this frame for the whole answer
    return await subscribe(request, stream, 0)


async def get_chat(request: web.Request) -> web.StreamResponse:
    """EventSource's route: ``GET /chat?prompt=``; its reconnect resumes its own stream."""
    for key in request.query:
        if key not in GET_PARAMS:
            return error_response(400, f"'{key}' is not a supported query parameter; supported: prompt, model",
                                  param=key, refusal="invalid")
    last = _last_event_id(request)
    if last is not None:
        # A reconnect.  Never start a new (paid) generation for an id we do not know.
        parsed = parse_event_id(last)
        if parsed is None:
            return error_response(400, "Last-Event-ID is not an event id of this relay", param="Last-Event-ID",
                                  refusal="invalid")
        return await resume(request, parsed[0], parsed[1])
    body: dict[str, Any] = {"prompt": request.query.get("prompt", "")}
    if "model" in request.query:
        body["model"] = request.query["model"]
    try:
        stream = await _start(request, body, wait=False)
    except (BadRequest, *Refused) as exc:
        return _refusal(exc)
    return await subscribe(request, stream, 0)


async def get_stream(request: web.Request) -> web.StreamResponse:
    stream_id = request.match_info["id"]
    last = _last_event_id(request)
    if last is None:
        return await resume(request, stream_id, -1)
    parsed = parse_event_id(last)
    if parsed is None:
        return error_response(400, "Last-Event-ID is not an event id of this relay", param="Last-Event-ID",
                                  refusal="invalid")
    if parsed[0] != stream_id:
        return error_response(400, "Last-Event-ID belongs to another stream", param="Last-Event-ID",
                              refusal="invalid")
    return await resume(request, stream_id, parsed[1])


async def resume(request: web.Request, stream_id: str, last_seq: int | None) -> web.StreamResponse:
    """Replay after ``last_seq`` (-1: from the start; None: the client has its end), then follow."""
    stream = request.app[REGISTRY].get(stream_id)
    if stream is not None and stream.kind != "chat":
        raise _not_found()  # another view's (a background response): not a /chat stream
    if stream is None:
        return await _resume_remote(request, stream_id, last_seq)
    _check_access(request, stream.id, stream.owner)
    if last_seq is None or (stream.finished and last_seq + 1 >= stream.next_seq):
        # 204 is what stops EventSource from reconnecting forever.
        _resumed(request, last_seq, "no_content")
        return web.Response(status=204)
    base, _ = stream.logged()
    _resumed(request, last_seq, "resume_expired" if last_seq + 1 < base else "replayed")
    return await subscribe(request, stream, last_seq + 1)


def _resumed(request: web.Request, last_seq: int | None, result: str) -> None:
    """Count a resume (a request with a Last-Event-ID; a first GET of a 201 stream is not one)."""
    metrics = request.app.get(METRICS)
    if metrics is not None and last_seq != -1:
        metrics.resumes.labels(result).inc()


async def delete_stream(request: web.Request) -> web.StreamResponse:
    stream_id = request.match_info["id"]
    stream = request.app[REGISTRY].get(stream_id)
    if stream is not None:
        _check_access(request, stream.id, stream.owner)
        stream.cancel("cancelled", "the stream was stopped by a client")
        return web.Response(status=204)
    store = request.app[REGISTRY].store
    try:
        remote = await store.lookup(stream_id)
        if remote is None or remote.kind != "chat":
            raise _not_found()
        _check_access(request, remote.id, remote.owner)
        if remote.end is None:
            await store.cancel(stream_id)  # to whichever instance produces it
    except StoreUnavailable as exc:
        return store_unavailable(exc)
    return web.Response(status=204)


def _check_access(request: web.Request, stream_id: str, stream_owner: str | None) -> None:
    """Return if this request may read or stop the stream; else raise 404 (or 401 for a bad events URL).

    With tokens, a stream belongs to the token that started it: another token gets the same 404
    as an unknown id, so it learns nothing.  A request without a token gets here only with an
    events URL's capability (relay/http/guard.py), which must be valid for this stream and owner.
    """
    checker = request.app[ACCESS]
    if not checker.enabled:
        return  # the id itself is the capability (128 random bits)
    owner = access.owner(request)
    if owner is not None:
        if owner != stream_owner:
            raise _not_found()
        return
    why = checker.capability_error(stream_id, stream_owner, request.query.get("exp", ""),
                                   request.query.get("sig", ""))
    if why is not None:
        raise web.HTTPUnauthorized(
            text=dumps({"error": {"message": why, "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}}),
            content_type="application/json")


async def _resume_remote(request: web.Request, stream_id: str, last_seq: int | None) -> web.StreamResponse:
    """A stream this process does not hold: from the shared store, if there is one and it has it."""
    store = request.app[REGISTRY].store
    if not store.shared:
        _resumed(request, last_seq, "not_found")
        raise _not_found()
    try:
        remote = await store.lookup(stream_id)
    except StoreUnavailable as exc:
        _resumed(request, last_seq, "store_unavailable")
        return store_unavailable(exc)
    if remote is None or remote.kind != "chat":
        _resumed(request, last_seq, "not_found")
        raise _not_found()
    _check_access(request, remote.id, remote.owner)
    if last_seq is None or (last_seq == remote.end and not remote.interrupted):
        _resumed(request, last_seq, "no_content")
        return web.Response(status=204)
    # After an interrupted end, a position at or past it is one the producer sent from memory
    # before it died, beyond what reached Redis: follow() gives that client the end.
    if remote.unreplayable:
        _resumed(request, last_seq, "store_incomplete")
        return error_response(503, "this stream's copy in the shared store is incomplete (Redis was lost or too "
                              "slow while it ran), so it cannot be resumed here; start a new chat",
                              code="store_incomplete")
    config: Config = request.app[CONFIG]
    resp = event_stream(request, {"Location": f"/chat/{stream_id}"})
    counted = False

    async def send() -> None:
        nonlocal counted
        # The headers go out now, not with the first event (aiohttp sends them with the first
        # write): the stream may be silent for a while (a model thinking), and a proxy or an
        # EventSource waiting on headers looks like a hung connection.
        await resp.send_bytes(KEEPALIVE)
        try:
            async for data in store.follow(remote, last_seq + 1, interrupted_event(stream_id, config.retry_ms)):
                if not counted:
                    counted = True
                    _resumed(request, last_seq, "replayed")
                await resp.send_bytes(data)
        except ResumeExpired:
            if not counted:
                counted = True
                _resumed(request, last_seq, "resume_expired")
            await resp.send_bytes(last_event(stream_id, RESUME_EXPIRED))
        except StoreUnavailable as exc:
            # An honest end, never a silent cut: a retriable error without an id, so the client's
            # reconnect resumes from its last real event (a 503 naming the cause while the store
            # is away, the stream's state once it is back).
            log.warning("stream %s: a remote reader lost the shared store: %s", stream_id, exc)
            await resp.send_bytes(unavailable_event(str(exc), config.retry_ms))

    return await serve_events(request, resp, stream_id, send)


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text='{"error": {"message": "no such stream: the id is unknown or the stream has expired", '
             '"type": "invalid_request_error", "param": null, "code": null}}',
        content_type="application/json",
    )


async def subscribe(request: web.Request, stream: Generation, pos: int) -> web.StreamResponse:
    """Send the stream's events from ``pos`` on, then follow live until its end."""
    resp = event_stream(request, {"Location": f"/chat/{stream.id}"})
    sub = stream.attach(pos, resp.try_send)

    async def send() -> None:
        if not await follow(resp, stream, sub):
            await resp.send_bytes(last_event(stream.id, RESUME_EXPIRED))

    return await serve_events(request, resp, stream.id, send, lambda: stream.detach(sub))
