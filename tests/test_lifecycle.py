"""A stalled client is cut without holding others back; nothing leaks after cancels and failures."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import re
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, open_connections, sse, text_of, tokens, wait_for
from relay.http.appkeys import REGISTRY

BIG = [f"{i:04d}" + "x" * 32_000 for i in range(300)]  # ~9.6 MB: more than any kernel buffers hold


async def test_stalled_subscriber_is_aborted_and_others_get_every_event(
        make_relay: Any, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    bound = 64 * 1024
    relay = await make_relay(send_buffer=bound, send_timeout=0.5, replay_bytes=32 * 1024 * 1024)

    async def gated(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await fake.release.wait()
        return await tokens(BIG)(request, fake)
    upstream.behaviour = gated

    reader = SSEClient(await relay.post("/chat", json={"prompt": "hi"}))
    start = await reader.next_json()
    assert start is not None
    stream = relay.app[REGISTRY].get(start["id"])

    # The stalled client: a tiny receive window, and it never reads.
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(stalled, (relay.host, relay.port))
        await loop.sock_sendall(stalled, f"GET /chat/{start['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await wait_for(lambda: stream.subscribers == 2)
        with caplog.at_level(logging.WARNING, logger="relay.http"):
            upstream.release.set()
            events = await reader.all()
            assert text_of(events) == "".join(BIG)  # the reading client got every event
            assert events[-1]["type"] == "done"
            await wait_for(lambda: stream.subscribers == 0)  # the stalled one was cut
        aborted = [r.getMessage() for r in caplog.records if "stopped reading" in r.getMessage()]
        assert len(aborted) == 1
        queued = int(re.search(r"aborted with (\d+) bytes queued", aborted[0]).group(1))  # type: ignore[union-attr]
        assert 0 < queued <= bound
    finally:
        stalled.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def faulty(kind: str) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        if kind == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if kind == "401":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("part")))
        if kind == "garbage":
            await fake.send(resp, b"data: {{{\n\n")
        elif kind == "reset":
            assert request.transport is not None
            request.transport.abort()
        elif kind == "eof":
            pass
        return resp
    return run


async def test_no_fds_or_tasks_leak_after_cancels_and_faulty_upstreams(make_relay: Any,
                                                                       upstream: FakeUpstream) -> None:
    rng = random.Random(1234)
    relay = await make_relay(resume_grace=0)
    upstream.keepalive = False  # idle pooled connections are not leaks; keep them out of the count

    async def varied(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        body = await request.json()
        kind = body["messages"][0]["content"]
        if kind == "slow":
            return await tokens([f"t{i}" for i in range(20)], delay=0.01)(request, fake)
        return await faulty(kind)(request, fake)
    upstream.behaviour = varied

    # force_close: no idle keep-alive sockets left in the client's pool to blur the count.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        base = relay.make_url("")

        async def cancelled_at_random(n: int) -> None:
            resp = await client.post(f"{base}/chat", json={"prompt": "slow"})
            reader = SSEClient(resp)
            start = await reader.next_json()
            assert start is not None
            for _ in range(rng.randrange(0, 15)):
                await reader.next()
            if n % 2:
                assert (await client.delete(f"{base}/chat/{start['id']}")).status == 204
            resp.close()

        async def failing(kind: str) -> None:
            resp = await client.post(f"{base}/chat", json={"prompt": kind})
            events = await SSEClient(resp).all()
            assert events[-1]["type"] == "error"

        await failing("500")  # warm up lazily created state (pools, loggers) before counting
        servers = (relay.server, upstream.server)
        await wait_for(lambda: open_connections(*servers) == 0, what="warm-up connections closed")
        gc.collect()
        fds, tasks = open_fds(), len(asyncio.all_tasks())
        await asyncio.gather(*(cancelled_at_random(n) for n in range(100)))
        await asyncio.gather(*(failing(["500", "401", "garbage", "reset", "eof"][n % 5]) for n in range(100)))
        registry = relay.app[REGISTRY]
        await wait_for(lambda: registry.live == 0)
        await wait_for(lambda: open_connections(*servers) == 0, what="every connection closed")
        # At most as many as before: a socket of the warm-up may still have been closing when
        # the baseline was taken, but 200 streams that each leaked one would stay far above it.
        await wait_for(lambda: len(asyncio.all_tasks()) <= tasks,
                       what=f"tasks back to {tasks} (now {len(asyncio.all_tasks())})")
        await wait_for(lambda: open_fds() <= fds, what=f"fds back to {fds} (now {open_fds()})")
    assert registry.live == 0
