"""Backpressure: with every reader's buffer full, the producer stops reading the upstream (TCP then
holds the upstream back) and resumes when a reader drains; with no reader attached it reads one
replay log's worth and waits.  Nothing is lost: the answer is only paced by its reader."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, sse, text_of, wait_for
from relay.http.appkeys import REGISTRY
from relay.sse import SSEDecoder

Client = Any
PIECE = "x" * 4000
PIECES = 3000  # 12 MB of content: far more than every buffer between the fake and the reader


class Flood:
    """An upstream that writes as fast as TCP lets it; it remembers its transport to look at."""

    def __init__(self, go: asyncio.Event | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.done = False
        #: When given, the flood waits for it after the first chunk.
        self.go = go

    async def __call__(self, request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        self.transport = request.transport  # type: ignore[assignment]
        await fake.send(resp, sse(chunk("", role="assistant")))
        if self.go is not None:
            await self.go.wait()
        for _ in range(PIECES):
            await resp.write(sse(chunk(PIECE)))  # waits (drain) while the relay is not reading
            self.sent += 1
        await fake.send(resp, sse(chunk(finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        self.done = True
        return resp

    def blocked(self) -> bool:
        # Bytes wait in the fake's own transport only when its socket takes no more: the relay
        # has stopped reading and the TCP window is closed.
        return self.transport is not None and self.transport.get_write_buffer_size() > 0


def stalled_client(port: int, body: dict[str, Any]) -> socket.socket:
    """A client with a tiny receive buffer that sends its request and then does not read."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    # HTTP/1.0: the answer is the raw event stream until the close (no chunked framing to undo).
    s.sendall(b"POST /chat HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def read_all(s: socket.socket) -> bytes:
    parts = []
    while part := s.recv(65536):
        parts.append(part)
    return b"".join(parts)


async def test_a_stalled_reader_stops_the_upstream_and_reading_again_resumes_it(make_relay: Any,
                                                                               upstream: FakeUpstream) -> None:
    flood = Flood()
    upstream.behaviour = flood
    relay = await make_relay(send_buffer=64 * 1024, replay_bytes=256 * 1024, send_timeout=120)
    registry = relay.app[REGISTRY]
    s = await asyncio.to_thread(stalled_client, relay.port, {"prompt": "hi"})
    try:
        await wait_for(lambda: registry.live == 1, what="the generation started")
        gen = next(iter(registry._live))
        await wait_for(lambda: gen.paused, what="the producer stopped reading the upstream")
        await wait_for(flood.blocked, what="the upstream's writes block")
        # The kernel may still take some of what is queued for the reader (its buffers grow), each
        # time letting the producer on by a batch; once they are full the pause holds.
        async with asyncio.timeout(10):
            while True:
                held = gen.next_seq
                for _ in range(20):
                    await asyncio.sleep(0)  # let every ready callback run: nothing is appended while paused
                if gen.paused and gen.next_seq == held:
                    break
                await asyncio.sleep(0.01)
        assert not flood.done and flood.sent < PIECES  # the upstream is held back, not read to the end
        raw = await asyncio.to_thread(read_all, s)  # the reader reads: the stream resumes, to its end
    finally:
        s.close()
    assert flood.done
    body = raw.split(b"\r\n\r\n", 1)[1]
    events = [json.loads(e.data) for e in SSEDecoder().feed(body)]
    assert text_of(events) == PIECE * PIECES and events[-1]["type"] == "done"


async def test_with_no_reader_attached_it_reads_one_replay_log_then_waits(make_relay: Any,
                                                                         upstream: FakeUpstream) -> None:
    flood = Flood()
    upstream.behaviour = flood
    replay = 256 * 1024
    relay = await make_relay(replay_bytes=replay, attach_timeout=120)
    resp = await relay.post("/chat", json={"prompt": "hi"}, headers={"Accept": "application/json"})
    assert resp.status == 201
    stream_id = (await resp.json())["id"]
    gen = relay.app[REGISTRY].get(stream_id)
    assert gen is not None
    await wait_for(lambda: gen.paused, what="the producer waits for a reader")
    assert gen.log_bytes < 2 * replay and not flood.done
    events = await SSEClient(await relay.get(f"/chat/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.0"})).all()
    assert text_of(events) == PIECE * PIECES and events[-1]["type"] == "done"


async def test_a_stalled_reader_costs_a_few_hundred_kilobytes_not_megabytes_before_the_pause(
        make_relay: Any, upstream: FakeUpstream) -> None:
    # What a stalled reader costs is what is produced before it is found full.  Before: half the
    # send buffer (128 KiB) of the relay's queue, plus whatever the kernel's autotuned send buffer
    # took (megabytes on loopback: 3.1 MB here), which for 300 stalled readers was minutes of CPU
    # before the last was paused (bench/RESULTS.md, "Stalled readers").  Now: the pause mark
    # (16 KiB) and one batch, plus a fixed kernel send buffer.
    go = asyncio.Event()
    flood = Flood(go)
    upstream.behaviour = flood
    relay = await make_relay(send_timeout=120)
    registry = relay.app[REGISTRY]
    s = await asyncio.to_thread(stalled_client, relay.port, {"prompt": "hi"})
    try:
        await wait_for(lambda: registry.live == 1, what="the generation started")
        gen = next(iter(registry._live))
        # The flood starts once the reader's handler follows (a burst before that is one-off).
        await wait_for(lambda: any(sub.waiter is not None for sub in gen._subscribers), what="the reader follows")
        go.set()
        await wait_for(lambda: gen.paused, what="the producer stopped reading the upstream")
        async with asyncio.timeout(10):  # until the pause holds (the kernel's buffers are full)
            while True:
                held = gen.next_seq
                for _ in range(20):
                    await asyncio.sleep(0)
                if gen.paused and gen.next_seq == held:
                    break
                await asyncio.sleep(0.01)
        assert gen.tally.bytes < 512 * 1024
    finally:
        s.close()


async def test_a_reader_cut_by_the_send_timeout_is_counted(make_relay: Any, upstream: FakeUpstream) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from test_metrics import scrape, value

    from relay.http.appkeys import METRICS

    flood = Flood()
    upstream.behaviour = flood
    relay = await make_relay(send_timeout=0.3, resume_grace=0, metrics_listen="127.0.0.1:0")
    metrics = relay.app[METRICS]
    assert metrics is not None and metrics.url is not None
    s = stalled_client(relay.port, {"prompt": "hi"})
    try:
        await asyncio.wait_for(upstream.closed.wait(), 30)  # cut, and with it the upstream
        samples = await scrape(metrics.url)
        assert value(samples, "relay_clients_cut_total", reason="send_timeout") == 1
        assert value(samples, "relay_client_disconnects_total", endpoint="chat") == 1
        assert value(samples, "relay_upstream_closed_unheard_total", endpoint="chat") == 1
    finally:
        s.close()
