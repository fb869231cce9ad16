"""The producer hands a waiting subscriber's batches straight to its sink (no task switch per batch)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, sse, text_of, tokens
from relay.config import Config
from relay.core.registry import Registry
from relay.http.chat_wire import ChatWire
from relay.http.sse_response import EventStream
from relay.sse import SSEDecoder
from relay.upstream.pool import Pool, shortcut_spec


async def test_a_waiting_subscriber_gets_every_batch_through_its_sink_and_is_woken_only_to_answer_and_end(
        upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["a", "b", "c", "d"], delay=0.01)
    config = Config(upstream=upstream.base_url, api_key=TEST_KEY, model="fake-model")
    async with aiohttp.ClientSession() as session:
        registry = Registry(config, Pool.build(session, config, [shortcut_spec(config, upstream.base_url)]))
        gen = registry.create(kind="chat", model="fake-model", body={"model": "fake-model", "messages": []},
                              wire=ChatWire(model="fake-model", demo=False, retry_ms=1000))
        taken: list[bytes] = []
        sub = gen.attach(0, lambda data: taken.append(data) or True)
        first = gen.read(sub)  # the start event, read as a subscriber does before it waits
        wakes = 0
        while not gen.finished:
            await gen.changed(sub)
            wakes += 1
        rest = gen.read(sub)  # the end event: never given to the sink, it wakes the subscriber
        assert wakes == 2  # the upstream answered (a view may commit its status), and the end: no batch woke it
        events = SSEDecoder().feed(first + b"".join(taken) + rest)
        objs = [json.loads(e.data) for e in events]
        assert text_of(objs) == "abcd" and objs[0]["type"] == "start" and objs[-1]["type"] == "done"
        assert taken  # (batches may hold several events)
        await registry.close()


async def test_a_refusing_sink_wakes_the_subscriber_and_loses_nothing(upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["a", "b", "c"], delay=0.01)
    config = Config(upstream=upstream.base_url, api_key=TEST_KEY, model="fake-model")
    async with aiohttp.ClientSession() as session:
        registry = Registry(config, Pool.build(session, config, [shortcut_spec(config, upstream.base_url)]))
        gen = registry.create(kind="chat", model="fake-model", body={"model": "fake-model", "messages": []},
                              wire=ChatWire(model="fake-model", demo=False, retry_ms=1000))
        sub = gen.attach(0, lambda data: False)
        got = bytearray(gen.read(sub))
        while not gen.finished:
            await gen.changed(sub)
            got += gen.read(sub)
        got += gen.read(sub)
        objs = [json.loads(e.data) for e in SSEDecoder().feed(bytes(got))]
        assert text_of(objs) == "abc" and objs[-1]["type"] == "done"
        await registry.close()


async def test_try_send_writes_synchronously_on_a_real_response_and_refuses_past_the_bound(
        aiohttp_client: Any) -> None:
    """Pins what EventStream.try_send relies on: aiohttp's write(drain=False) does not suspend."""
    results: dict[str, Any] = {}
    proceed = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = EventStream(keepalive=60, send_timeout=5, send_buffer=4096)
        await resp.prepare(request)
        results["small"] = resp.try_send(sse(chunk("direct")))
        results["too_big"] = resp.try_send(b"x" * 10_000)  # more than one piece of the bound
        await proceed.wait()
        resp.stop_streaming()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    reader = SSEClient(await client.get("/"))
    event = await reader.next_json()
    assert event is not None and event["choices"][0]["delta"]["content"] == "direct"
    assert results == {"small": True, "too_big": False}
    proceed.set()
