"""POST /chat end to end: real relay, real fake upstream, real sockets on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, sse, text_of, tokens, wait_for

Client = Any


async def chat(relay: Client, body: dict[str, Any] | None = None, **kw: Any) -> SSEClient:
    resp = await relay.post("/chat", json=body or {"prompt": "hi"}, **kw)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return SSEClient(resp)


async def test_stream_relays_every_delta_in_order_then_done(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["Hel", "lo", " wörld", " 😀", "\n\nbye\r\n"])
    events = await (await chat(relay)).all()
    assert events[0]["type"] == "start" and events[0]["model"] == "fake-model" and events[0]["demo"] is False
    assert text_of(events) == "Hello wörld 😀\n\nbye\r\n"
    assert events[-1] == {"type": "done", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
    assert [e["type"] for e in events].count("done") == 1


async def test_start_event_carries_retry_and_location_names_the_stream(relay: Client) -> None:
    client = await chat(relay)
    first = await client.next()
    assert first is not None
    start = json.loads(first.data)
    assert client.decoder.retry == 2000
    assert client.resp.headers["Location"] == f"/chat/{start['id']}"
    assert first.id == f"{start['id']}.0"
    await client.all()


async def test_upstream_request_holds_key_and_stream_options(relay: Client, upstream: FakeUpstream) -> None:
    await (await chat(relay, {"messages": [{"role": "user", "content": "x"}], "temperature": 0.5})).all()
    assert upstream.headers[0]["Authorization"] == f"Bearer {TEST_KEY}"
    assert upstream.requests[0] == {"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                                    "temperature": 0.5, "stream": True,
                                    "stream_options": {"include_usage": True}}


async def test_every_event_id_names_the_stream_and_position(relay: Client) -> None:
    client = await chat(relay)
    ids = []
    while (event := await client.next()) is not None:
        ids.append(event.id)
    stream_id = ids[0].split(".")[0]
    assert len(stream_id) >= 22  # 128 random bits, base64url
    assert ids == [f"{stream_id}.{i}" for i in range(len(ids))]


async def test_two_hundred_concurrent_streams_lose_and_duplicate_nothing(relay: Client,
                                                                          upstream: FakeUpstream) -> None:
    async def behaviour(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        body = await request.json()
        n = body["messages"][0]["content"]
        return await tokens([f"<{n}:{i}>" for i in range(30)])(request, fake)
    upstream.behaviour = behaviour

    async def one(n: int) -> str:
        resp = await relay.post("/chat", json={"prompt": str(n)})
        return text_of(await SSEClient(resp).all())

    texts = await asyncio.gather(*(one(n) for n in range(200)))
    for n, text in enumerate(texts):
        assert text == "".join(f"<{n}:{i}>" for i in range(30))
    assert upstream.calls == 200


async def test_start_event_arrives_while_upstream_is_silent(relay: Client, upstream: FakeUpstream) -> None:
    async def silent(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await fake.release.wait()
        return await tokens(["late"])(request, fake)
    upstream.behaviour = silent
    client = await chat(relay)
    first = await client.next_json()
    assert first is not None and first["type"] == "start"
    assert not upstream.release.is_set()  # the start event came before the upstream said anything
    upstream.release.set()
    assert text_of(await client.all()) == "late"


async def test_keepalives_during_long_wait_are_single_comment_lines_that_decoders_ignore(
        make_relay: Any, upstream: FakeUpstream) -> None:
    from httpx_sse._decoders import SSEDecoder as HttpxDecoder, SSELineDecoder
    from openai._streaming import SSEDecoder as OpenAIDecoder

    async def silent(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await fake.release.wait()
        return await tokens(["after the wait"])(request, fake)
    upstream.behaviour = silent
    relay = await make_relay(keepalive=0.05)
    client = await chat(relay)
    await client.next()  # start
    # Read raw bytes until three keepalives arrived during the upstream's silence.
    while client.raw.count(b":keepalive\n") < 3:
        data = await client.resp.content.readany()
        assert data
        client.raw += data
        client.pending.extend(client.decoder.feed(data))
    assert not client.pending  # keepalives dispatched nothing
    upstream.release.set()
    events = [json.loads(e.data) for e in client.pending] + await client.all()
    assert text_of(events) == "after the wait"
    raw = bytes(client.raw)
    assert b":keepalive\n\n" not in raw  # never a comment followed by a blank line

    openai_events = list(OpenAIDecoder().iter_bytes(iter([raw])))
    assert openai_events and all(e.data for e in openai_events)
    line_decoder, httpx_decoder = SSELineDecoder(), HttpxDecoder()
    httpx_events = [e for line in line_decoder.decode(raw.decode()) + line_decoder.flush()
                    if (e := httpx_decoder.decode(line)) is not None]
    assert httpx_events and all(e.data for e in httpx_events)
    assert len(openai_events) == len(httpx_events) == len(events) + 1  # + the start event


async def test_client_disconnect_closes_upstream_before_next_chunk(make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens([f"t{i}" for i in range(10)], delay=1.0)
    relay = await make_relay(resume_grace=0)
    client = await chat(relay)
    while (event := await client.next_json()) is not None and event["type"] != "delta":
        pass
    sent_when_dropped = upstream.chunks_sent
    client.resp.close()
    await asyncio.wait_for(upstream.closed.wait(), 10)
    # The upstream saw its connection closed before its next chunk (1 s later) was due.
    assert upstream.closed_after_chunks == sent_when_dropped


@pytest.mark.parametrize("keepalive", [0.05, 15.0], ids=["keepalive-due", "keepalive-not-due"])
async def test_client_disconnect_while_upstream_silent_closes_upstream(make_relay: Any, upstream: FakeUpstream,
                                                                       keepalive: float) -> None:
    async def silent(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        await fake.release.wait()
        return resp
    upstream.behaviour = silent
    relay = await make_relay(resume_grace=0, keepalive=keepalive)
    client = await chat(relay)
    await client.next()
    await wait_for(lambda: upstream.chunks_sent == 1)  # the upstream is now mid-answer, silent
    client.resp.close()
    await asyncio.wait_for(upstream.closed.wait(), 10)
    assert not upstream.release.is_set()


async def test_one_log_line_per_finished_stream_with_outcome_and_tokens(
        relay: Client, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    upstream.behaviour = tokens(["a", "b", "c"])
    with caplog.at_level("INFO", logger="relay.generation"):
        events = await (await chat(relay)).all()
        await wait_for(lambda: any("outcome=" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"chat {events[0]['id']} model=fake-model outcome=done ttft=")
    assert "deltas=3" in lines[0] and "tokens=3+3" in lines[0]
    assert TEST_KEY not in lines[0]
