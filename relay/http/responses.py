"""The Responses API view: ``POST /v1/responses``, OpenAI's newer API, which its SDKs, the Agents
SDK and the Vercel AI SDK's default provider call; and the background responses the relay keeps.

The same core and guarantees as ``/v1/chat/completions`` (relay/http/openai.py): one generation in
the one registry, the status line held until the upstream answers (real status codes, SDK
exceptions and retries), keepalives, the upstream closed the moment the client leaves, one honest
ending, limits, failover before the first event, drain.  The upstream's typed events go out
byte-identical (relay/http/responses_wire.py).

``background: true`` answers are the relay's own, whatever the upstream supports: the upstream
streams an ordinary answer, the relay keeps its events (a resumable generation that runs on with
nobody listening) and serves ``GET /v1/responses/{id}`` (the latest response object),
``GET /v1/responses/{id}?stream=true&starting_after=N`` (replay after N, then follow) and
``POST /v1/responses/{id}/cancel`` (the upstream closed at once) from its log; with ``--redis``, on
any instance, from the log's shared copy, and after the producing process died (the retriable
``interrupted`` error event, as ``/chat`` readers get).  A request continuing a conversation
(``previous_response_id``) goes to the upstream that made that response (relay/upstream/pool.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Final

from aiohttp import web

from relay.core.eventlog import ResumeExpired
from relay.core.generation import Generation
from relay.core.store import Remote, StoreUnavailable
from relay.core.wire import Ending
from relay.http import access
from relay.http.admission import Refused, refusal, start_generation
from relay.http.appkeys import ACCESS, CATALOG, CONFIG, REGISTRY, UPSTREAMS
from relay.http.body import BadRequest, read_json
from relay.http.errors import error_response, json_response, request_refusal, store_unavailable
from relay.http.openai import send_completion, send_stream
from relay.http.params import RequestBounds
from relay.http.responses_body import input_items as input_items_of
from relay.http.responses_body import responses_request
from relay.http.responses_wire import ResponsesWire, error_event
from relay.http.sse_response import KEEPALIVE, event_stream, follow, serve_events
from relay.upstream.errors import UpstreamError
from relay.upstream.route import conversation_of

log = logging.getLogger("relay.http")

#: A background response's id is the relay's: this prefix and its generation's id.
PREFIX: Final = "resp_"
#: What a response id may be before it is put in an upstream's path.
_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,200}")
#: The query parameters the stateful routes take (OpenAI's), passed on; nothing else is.
_FORWARDED_QUERY: Final = frozenset({"include[]", "include", "after", "before", "limit", "order"})
LAGGED = Ending("client_too_slow", "the client read the stream too slowly and fell behind what the relay keeps")
EXPIRED = Ending("resume_expired", "the events after this position have left what the relay keeps for this response")
INTERRUPTED = Ending("interrupted", "the relay process producing this response stopped before it finished; "
                     "the events up to here are all there is", retriable=True)


def _lagged(gen: Generation) -> bytes:
    wire = gen.wire
    return error_event(LAGGED, wire.last_sequence + 1 if isinstance(wire, ResponsesWire) else 0)


async def create_response(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    catalog = request.app[CATALOG]
    try:
        req = responses_request(await read_json(request), default_model=catalog.default_model,
                                models=catalog.allowed, limits=RequestBounds.of(config))
        pool = request.app[UPSTREAMS]
        why = pool.no_api(req.model, "responses")
        if why is not None:
            raise BadRequest(why, "model")
        upstream = None
        previous = req.body.get("previous_response_id")
        conversation = conversation_of(req.body)
        if isinstance(previous, str):
            # The conversation lives on the upstream that made that response, under its id there
            # (a background response's id is the relay's own).
            origin = await pool.origin_of(previous)
            if origin is not None:
                upstream, req.body["previous_response_id"] = origin
        elif conversation is not None:
            # A Conversations API object lives on the upstream that answered in it before.
            origin = await pool.origin_of(conversation)
            if origin is not None:
                upstream = origin[0]
        wire = ResponsesWire(PREFIX if req.background else None, upstream)
        if req.background:
            wire.input_items = input_items_of(req.body)
        gen = await start_generation(request, kind="responses", model=req.model, body=req.body, wire=wire,
                                     resumable=req.background, streaming=req.stream or req.background,
                                     background=req.background)
    except BadRequest as exc:
        return error_response(exc.status, exc.message, param=exc.param, refusal=request_refusal(exc.status))
    except Refused as exc:
        return refusal(exc)
    stream, background = req.stream, req.background
    del req  # its body: not held by this frame for the whole answer
    if background:
        wire.set_id(PREFIX + gen.id)  # before its producer runs: no event has been encoded yet
        if request.app[REGISTRY].store.shared:
            request.app[REGISTRY].store.keep_input(gen.id, json.dumps(wire.input_items).encode())
        if not stream:
            # OpenAI's answer to a background request: the response, queued, at once.
            await request.app[REGISTRY].store.ready(gen.id)
            return json_response(snapshot(gen))
    sub = gen.attach(0)  # attached before anything can wait
    if stream:
        return await send_stream(request, config, gen, sub, lagged=_lagged)
    return await send_completion(gen, sub)


def shown(rid: str, latest: dict[str, Any] | None, *, ended: bool, failed: tuple[Any, Any] | None,
          model: str | None = None) -> dict[str, Any]:
    """A background response as ``GET /v1/responses/{id}`` shows it: the latest response object its
    events carried (or a queued one), its status from how it ended where the events do not say.
    ``failed``: the code and message it ended with, if not as the upstream meant."""
    obj: dict[str, Any] = dict(latest or {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "queued", "background": True,
        "error": None, "incomplete_details": None, "output": [], "usage": None,
        **({"model": model} if model is not None else {})})
    if failed is not None:
        code, message = failed
        obj["status"] = "cancelled" if code == "cancelled" else "failed"
        obj["error"] = None if code == "cancelled" else {"code": code, "message": message}
    elif not ended and obj.get("status") in ("completed", "incomplete", "failed"):
        obj["status"] = "in_progress"  # its last event is out, its end not yet recorded
    return obj


def snapshot(gen: Generation) -> dict[str, Any]:
    """A background response this process holds, as shown."""
    wire = gen.wire
    assert isinstance(wire, ResponsesWire)
    ending = gen.ending
    failed = (ending.code, ending.message) if ending is not None and ending.code != "done" else None
    return shown(PREFIX + gen.id, wire.snapshot, ended=ending is not None, failed=failed, model=gen.model)


def _background(request: web.Request) -> Generation | None:
    """The background response the path names, if this relay keeps it and the client may see it
    (with tokens, another token's response is as unknown as a made-up id)."""
    rid = request.match_info["id"]
    gen = request.app[REGISTRY].get(rid[len(PREFIX):]) if rid.startswith(PREFIX) else None
    if gen is None or not gen.background or (request.app[ACCESS].enabled and access.owner(request) != gen.owner):
        return None
    return gen


def _not_kept(request: web.Request) -> web.Response:
    return error_response(404, f"No response with id '{request.match_info['id'][:100]}' is kept by this relay "
                          "(it may have expired, or was not made in the background)", code="not_found")


async def _forward(request: web.Request, suffix: str = "") -> web.StreamResponse:
    """A response the relay does not keep (the upstream stored it: ``store``, the default at
    OpenAI): the request goes to the upstream that serves the Responses API, with the relay's key."""
    rid = request.match_info["id"]
    if not _ID.fullmatch(rid):
        return error_response(400, "a response id is letters, digits, '_' and '-' (at most 200)", param="id",
                              refusal="invalid")
    if request.query.get("stream", "false").lower() in ("true", "1"):
        return _not_kept(request)  # a stream is replayed only from the relay's own log
    members = [m for m in request.app[UPSTREAMS].members if m.speaks("responses")]
    if not members:
        return _not_kept(request)
    member = min(members, key=lambda m: m.spec.priority)
    query = [(k, v) for k, v in request.query.items() if k in _FORWARDED_QUERY]
    try:
        status, body = await member.client.forward(request.method, f"/responses/{rid}{suffix}", query,
                                                   request.app[CONFIG].max_upstream_event)
    except UpstreamError as exc:
        return error_response(504 if exc.code == "upstream_timeout" else 502, exc.message, code=exc.code)
    if status in (401, 403):
        return error_response(502, f"the upstream rejected the relay's credentials (HTTP {status}); the relay's "
                              "API key or upstream configuration needs fixing", code="upstream_auth_failed")
    if status == 404 and not _is_error_json(body):
        return _not_kept(request)  # the upstream has no such route either: the relay's own answer
    return web.Response(status=status, body=body, content_type="application/json")


def _is_error_json(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


async def _remote(request: web.Request) -> Remote | web.Response | None:
    """A background response another instance made (the shared store has its copy), if the client may see it."""
    rid = request.match_info["id"]
    store = request.app[REGISTRY].store
    if not rid.startswith(PREFIX) or not store.shared:
        return None
    try:
        remote = await store.lookup(rid[len(PREFIX):])
    except StoreUnavailable as exc:
        return store_unavailable(exc)
    if remote is None or remote.kind != "responses" or (
            request.app[ACCESS].enabled and access.owner(request) != remote.owner):
        return None
    return remote


def _remote_snapshot(rid: str, events: list[bytes]) -> dict[str, Any]:
    """A background response another instance made, as shown, from its events in the shared store."""
    latest, failure, done = ResponsesWire.snapshot_of(events)
    failed = (failure.get("code"), failure.get("message")) if failure is not None else None
    return shown(rid, latest, ended=done, failed=failed)


async def _retrieve_remote(request: web.Request, remote: Remote, after: int | None) -> web.StreamResponse:
    store = request.app[REGISTRY].store
    rid = request.match_info["id"]
    if after is None:
        try:
            return json_response(_remote_snapshot(rid, await store.events(remote)))
        except StoreUnavailable as exc:
            return store_unavailable(exc)
    if remote.unreplayable:
        return error_response(503, "this response's copy in the shared store is incomplete (Redis was lost or too "
                              "slow while it ran), so it cannot be read here", code="store_incomplete")
    resp = event_stream(request)

    async def send() -> None:
        await resp.send_bytes(KEEPALIVE)  # headers now: the response may be silent for a while
        try:
            async for data in store.follow(remote, after + 1, error_event(INTERRUPTED, None)):
                await resp.send_bytes(data)
        except ResumeExpired:
            await resp.send_bytes(error_event(EXPIRED, after + 1))
        except StoreUnavailable as exc:
            # An honest end, never a silent cut: OpenAI's error event, retriable, with no sequence
            # number (a retrieve with the last one the client has resumes from there).
            log.warning("response %s: a remote reader lost the shared store: %s", rid, exc)
            await resp.send_bytes(error_event(Ending("store_unavailable", f"{exc}; retrieve again to go on",
                                                     retriable=True), None))

    return await serve_events(request, resp, rid, send)


def _starting_after(request: web.Request) -> int | None | web.Response:
    """``starting_after`` of a ``stream=true`` retrieve (-1: from the start); None: not a stream."""
    if request.query.get("stream", "false").lower() not in ("true", "1"):
        return None
    after = request.query.get("starting_after", "-1")
    if not after.lstrip("-").isascii() or not after.lstrip("-").isdigit() or int(after) < -1:
        return error_response(400, "'starting_after' must be a sequence number (0 or more)", param="starting_after",
                              refusal="invalid")
    return int(after)


async def _find(request: web.Request) -> Generation | Remote | web.Response | None:
    """The background response the path names: held here, held by another instance (the shared
    store's copy), the store's 503, or None: the relay does not keep it."""
    gen = _background(request)
    return gen if gen is not None else await _remote(request)


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    found = await _find(request)
    if found is None:
        return await _forward(request)
    if isinstance(found, web.Response):
        return found
    after = _starting_after(request)
    if isinstance(after, web.Response):
        return after
    if isinstance(found, Remote):
        return await _retrieve_remote(request, found, after)
    gen = found
    if after is None:
        return json_response(snapshot(gen))
    resp = event_stream(request)
    sub = gen.attach(after + 1, resp.try_send)

    async def send() -> None:
        await resp.send_bytes(KEEPALIVE)  # headers now: the response may be silent for a while
        if not await follow(resp, gen, sub):
            await resp.send_bytes(error_event(EXPIRED, after + 1))

    # The reader leaves; a background response runs on.
    return await serve_events(request, resp, gen.id, send, lambda: gen.detach(sub))


async def delete_response(request: web.Request) -> web.StreamResponse:
    gen = _background(request)
    if gen is None:
        return await _forward(request)
    # The relay's own: stopped if it runs, and forgotten when its retention ends.
    gen.cancel("cancelled", "the response was deleted by a client")
    return json_response({"id": request.match_info["id"], "object": "response", "deleted": True})


async def input_items(request: web.Request) -> web.StreamResponse:
    found = await _find(request)
    if found is None:
        return await _forward(request, "/input_items")
    if isinstance(found, web.Response):
        return found
    if isinstance(found, Remote):
        try:
            kept = await request.app[REGISTRY].store.input_of(found.id)
        except StoreUnavailable as exc:
            return store_unavailable(exc)
        if kept is None:
            return error_response(404, "this background response's input is no longer kept", code="not_found")
        items: list[dict[str, Any]] = json.loads(kept)
    else:
        wire = found.wire
        items = wire.input_items if isinstance(wire, ResponsesWire) else []
    return _page(request, items)


def _page(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """One page of input items, as OpenAI pages them: ``order`` (desc: newest first), ``after`` an
    item id, ``limit`` 1 to 100 (20)."""
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        return error_response(400, "'order' must be asc or desc", param="order", refusal="invalid")
    limit_text = request.query.get("limit", "20")
    if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        return error_response(400, "'limit' must be a number from 1 to 100", param="limit", refusal="invalid")
    ordered = items if order == "asc" else items[::-1]
    after = request.query.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            return error_response(400, f"no input item {after!r} in this response", param="after", refusal="invalid")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:int(limit_text)]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page)})


async def cancel_response(request: web.Request) -> web.StreamResponse:
    found = await _find(request)
    if found is None:
        return await _forward(request, "/cancel")
    if isinstance(found, web.Response):
        return found
    if isinstance(found, Remote):
        remote = found
        store = request.app[REGISTRY].store
        try:
            if remote.end is None:
                await store.cancel(remote.id)  # to whichever instance produces it
            obj = _remote_snapshot(request.match_info["id"], await store.events(remote))
        except StoreUnavailable as exc:
            return store_unavailable(exc)
        if remote.end is None:
            obj["status"], obj["error"] = "cancelled", None
        return json_response(obj)
    gen = found
    if not gen.finished:
        gen.cancel("cancelled", "the response was cancelled by a client")  # the upstream closed at once
    obj = snapshot(gen)
    if not gen.finished:  # cancelled now; its producer records the end on its next step
        obj["status"], obj["error"] = "cancelled", None
    return json_response(obj)
