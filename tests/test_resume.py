"""Streams that survive the connection: replay by Last-Event-ID, 204/404, stop, grace, attach timeout."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, sse, text_of, tokens, wait_for
from relay.http.appkeys import REGISTRY

Client = Any

FIRST = [f"a{i} " for i in range(10)]
MISSED = [f"m{i} " for i in range(5)]
LIVE = [f"l{i} " for i in range(5)]
FULL = "".join(FIRST + MISSED + LIVE)


@dataclass
class Gates:
    missed: asyncio.Event = field(default_factory=asyncio.Event)
    live: asyncio.Event = field(default_factory=asyncio.Event)


def gated(gates: Gates) -> Any:
    """Ten tokens; wait; five (sent while the client is away); wait; five more (live)."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        for part in FIRST:
            await fake.send(resp, sse(chunk(part)))
        await gates.missed.wait()
        for part in MISSED:
            await fake.send(resp, sse(chunk(part)))
        await gates.live.wait()
        for part in LIVE:
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


async def open_stream(relay: Client, route: str) -> tuple[SSEClient, str]:
    """Start a chat through ``route``; returns the reader and the URL a reconnect goes to."""
    if route == "eventsource-get":
        resp = await relay.get("/chat", params={"prompt": "hi"})
        return SSEClient(resp), "/chat?prompt=hi"
    if route == "post-201":
        created = await relay.post("/chat", json={"prompt": "hi"}, headers={"Accept": "application/json"})
        assert created.status == 201
        body = await created.json()
        assert created.headers["Location"] == body["events"]
        resp = await relay.get(body["events"])
        return SSEClient(resp), body["events"]
    resp = await relay.post("/chat", json={"prompt": "hi"})
    return SSEClient(resp), resp.headers["Location"]


async def read_deltas(client: SSEClient, n: int) -> tuple[list[dict[str, Any]], str]:
    events, last_id = [], ""
    while sum(e["type"] == "delta" for e in events) < n:
        event = await client.next()
        assert event is not None
        events.append(json.loads(event.data))
        last_id = event.id
    return events, last_id


@pytest.mark.parametrize(("route", "via"), [
    ("post-sse", "header"), ("eventsource-get", "header"), ("post-201", "header"), ("post-sse", "query"),
], ids=["post-then-get", "eventsource-reconnect", "201-then-get", "lastEventId-query"])
async def test_reconnect_gets_exactly_the_missing_events_then_the_rest_live(
        relay: Client, upstream: FakeUpstream, route: str, via: str) -> None:
    gates = Gates()
    upstream.behaviour = gated(gates)
    client, url = await open_stream(relay, route)
    before, last_id = await read_deltas(client, 10)
    client.resp.close()
    gates.missed.set()
    await wait_for(lambda: upstream.chunks_sent == 15)  # produced while nobody listened

    if via == "header":
        resp = await relay.get(url, headers={"Last-Event-ID": last_id})
    else:
        resp = await relay.get(url, params={"lastEventId": last_id})
    assert resp.status == 200
    again = SSEClient(resp)
    after = []
    for _ in MISSED:
        event = await again.next()
        assert event is not None
        after.append(event)
    gates.live.set()
    while (event := await again.next()) is not None:
        after.append(event)

    stream_id, seq = last_id.split(".")
    assert [e.id for e in after] == [f"{stream_id}.{int(seq) + 1 + i}" for i in range(len(after))]
    events = before + [json.loads(e.data) for e in after]
    assert text_of(events) == FULL
    assert events[-1]["type"] == "done"
    assert upstream.calls == 1


async def test_204_once_client_has_every_event_of_finished_stream(relay: Client) -> None:
    resp = await relay.post("/chat", json={"prompt": "hi"})
    client = SSEClient(resp)
    last = None
    while (event := await client.next()) is not None:
        last = event
    assert last is not None and json.loads(last.data)["type"] == "done"
    again = await relay.get(resp.headers["Location"], headers={"Last-Event-ID": last.id})
    assert again.status == 204
    # Without Last-Event-ID the whole finished stream is replayed.
    replay = await relay.get(resp.headers["Location"])
    assert text_of(await SSEClient(replay).all()) == "Hello, world!"


async def test_unknown_stream_is_404(relay: Client) -> None:
    resp = await relay.get("/chat/AAAAAAAAAAAAAAAAAAAAAA")
    assert resp.status == 404
    assert "unknown" in (await resp.json())["error"]["message"]
    assert (await relay.delete("/chat/AAAAAAAAAAAAAAAAAAAAAA")).status == 404


async def test_unknown_last_event_id_on_get_chat_starts_no_upstream_call(relay: Client,
                                                                         upstream: FakeUpstream) -> None:
    resp = await relay.get("/chat", params={"prompt": "hi"}, headers={"Last-Event-ID": "AAAAAAAAAAAAAAAAAAAAAA.3"})
    assert resp.status == 404
    resp = await relay.get("/chat", params={"prompt": "hi"}, headers={"Last-Event-ID": "garbage"})
    assert resp.status == 400
    assert upstream.calls == 0


async def test_position_older_than_the_log_gets_resume_expired(make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens([f"token-{i:03d} " for i in range(100)])
    # The answer (~8 KB) is more than the log keeps once read, yet under the 4x hard cap, so a
    # live reader gets it all however the upstream's bytes are batched.
    relay = await make_relay(replay_bytes=3000)
    resp = await relay.post("/chat", json={"prompt": "hi"})
    events = await SSEClient(resp).all()
    assert text_of(events) == "".join(f"token-{i:03d} " for i in range(100))  # a live reader misses nothing
    first_id = f"{events[0]['id']}.0"
    again = await relay.get(resp.headers["Location"], headers={"Last-Event-ID": first_id})
    assert again.status == 200
    client = SSEClient(again)
    expired = await client.all()
    assert [e["code"] for e in expired] == ["resume_expired"] and expired[0]["retriable"] is False
    # Its id says "nothing more for you": an EventSource reconnecting with it gets 204, not a loop.
    end = await relay.get(resp.headers["Location"], headers={"Last-Event-ID": client.decoder.last_event_id})
    assert end.status == 204


async def test_delete_mid_stream_closes_upstream_before_next_chunk(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens([f"t{i}" for i in range(10)], delay=1.0)
    resp = await relay.post("/chat", json={"prompt": "hi"})
    client = SSEClient(resp)
    start = await client.next_json()
    assert start is not None
    while (event := await client.next_json()) is not None and event["type"] != "delta":
        pass
    sent = upstream.chunks_sent
    stop = await relay.delete(f"/chat/{start['id']}")
    assert stop.status == 204
    rest = await client.all()
    assert rest[-1]["type"] == "error" and rest[-1]["code"] == "cancelled"
    await asyncio.wait_for(upstream.closed.wait(), 10)
    assert upstream.closed_after_chunks == sent  # closed before the next chunk was due


async def test_reconnect_within_grace_continues_the_same_generation(make_relay: Any, upstream: FakeUpstream) -> None:
    gates = Gates()
    upstream.behaviour = gated(gates)
    relay = await make_relay(resume_grace=30)
    client, url = await open_stream(relay, "post-sse")
    _, last_id = await read_deltas(client, 10)
    client.resp.close()
    resp = await relay.get(url, headers={"Last-Event-ID": last_id})
    gates.missed.set()
    gates.live.set()
    after = await SSEClient(resp).all()
    assert after[-1]["type"] == "done"
    assert not upstream.closed.is_set() and upstream.calls == 1


async def test_disconnect_for_good_closes_upstream_once_grace_passed(make_relay: Any, upstream: FakeUpstream) -> None:
    gates = Gates()
    upstream.behaviour = gated(gates)
    relay = await make_relay(resume_grace=0.3)
    client, url = await open_stream(relay, "post-sse")
    start, _ = await read_deltas(client, 10)
    stream = relay.app[REGISTRY].get(start[0]["id"])
    client.resp.close()
    await wait_for(lambda: stream.subscribers == 0)
    assert not stream.task.done()  # within the grace the generation goes on, waiting for a reconnect
    await asyncio.wait_for(upstream.closed.wait(), 10)
    assert stream.outcome == "cancelled"


async def test_201_with_nobody_attaching_closes_upstream_after_attach_timeout(make_relay: Any,
                                                                              upstream: FakeUpstream) -> None:
    upstream.behaviour = gated(Gates())
    relay = await make_relay(attach_timeout=0.3)
    created = await relay.post("/chat", json={"prompt": "hi"}, headers={"Accept": "application/json"})
    assert created.status == 201
    await asyncio.wait_for(upstream.closed.wait(), 10)
    resp = await relay.get((await created.json())["events"])
    events = await SSEClient(resp).all()
    assert events[-1]["code"] == "cancelled"


async def test_live_stream_cap_answers_503(make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = gated(Gates())
    relay = await make_relay(max_streams=2)
    for _ in range(2):
        assert (await relay.post("/chat", json={"prompt": "x"}, headers={"Accept": "application/json"})).status == 201
    resp = await relay.post("/chat", json={"prompt": "x"})
    assert resp.status == 503 and "limit of 2 live streams" in (await resp.json())["error"]["message"]



