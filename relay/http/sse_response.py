"""The SSE response: aiohttp-sse's EventSourceResponse with our keepalive and a bounded buffer.

aiohttp-sse gives the headers (``X-Accel-Buffering: no`` for nginx among them), the
TCP_USER_TIMEOUT that makes the kernel give up on a peer that stopped acknowledging, and the
abort of a stalled transport.  Two things it does differently from what we need:

1. Its ping writes ``": ping\\r\\n\\r\\n"`` on a fixed clock.  A comment followed by a blank
   line becomes an empty message in decoders that dispatch on a blank line once an ``id`` was
   seen (the openai SDK, httpx-sse, @microsoft/fetch-event-source).  Our ``_ping`` writes a
   single comment line, and only after ``keepalive`` seconds of silence.
2. A stalled client must not grow memory: bytes queued for it never pass ``send_buffer``;
   when the client takes nothing for ``send_timeout`` the connection is aborted.

The keepalive is written by the loop's one keepalive schedule (relay/http/keepalive.py), not
by a ping task per response, and never while a send is under way, so it can never land inside
an event.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import StreamWriter
from aiohttp_sse import EventSourceResponse

from relay.core.generation import Generation, ResumeExpired, Subscriber
from relay.http.appkeys import CONFIG, DISCONNECTS, METRICS, STREAM
from relay.http.keepalive import Entry, Keepalives
from relay.sse import comment

log = logging.getLogger("relay.http")

if TYPE_CHECKING:
    from relay.metrics import Metrics

KEEPALIVE = comment("keepalive")
#: Bytes queued for a client past which it counts as not keeping up: the producer's batches stop
#: going straight to it, its handler waits until the queue is back under this, and while every
#: reader of a generation waits so, the generation stops reading its upstream (backpressure).
#: Small on purpose: what a stalled reader costs is what is produced before it is found full.
PAUSE_BYTES = 16 * 1024
#: Chunked transfer framing around each write: hex length, CRLF, CRLF.
_CHUNK_OVERHEAD = 16


class SlowClient(Exception):
    """The client did not take its bytes within the send timeout; the connection was aborted."""


class EventStream(EventSourceResponse):
    def __init__(self, *, keepalive: float, send_timeout: float, send_buffer: int, sndbuf: int = 0,
                 headers: Mapping[str, str] | None = None, metrics: Metrics | None = None) -> None:
        super().__init__(headers=headers, allow_all_methods=True, send_timeout=send_timeout,
                         ping_interval=keepalive)
        # Writes go out in pieces of at most half the bound and wait while more than half is
        # queued, so what is queued never passes the bound (see send_bytes).
        self._high = max(send_buffer // 2, 2 * _CHUNK_OVERHEAD)
        self._piece = self._high - _CHUNK_OVERHEAD
        self._pause = min(self._high, PAUSE_BYTES)
        self._sndbuf = sndbuf
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._last_write = 0.0
        self._sending = False
        self._keepalive: Entry | None = None
        #: The most bytes this response ever had queued in the transport (for the slow-client log).
        self.peak_queued = 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        self._last_write = self._loop.time()
        # EventSourceResponse.prepare, but for its ping task: the library's TCP_USER_TIMEOUT (pinned
        # by tests/test_keepalive.py), the headers, chunked encoding; the keepalive is scheduled.
        self._set_tcp_user_timeout(request)
        writer = await web.StreamResponse.prepare(self, request)
        self.enable_chunked_encoding()
        self._keepalive = Keepalives.of(self._loop).add(self, self._last_write + self._ping_interval)
        transport = request.transport
        if transport is not None:
            # Above the mark the protocol pauses; drain() waits until it is resumed (a quarter of it).
            transport.set_write_buffer_limits(high=self._pause)
            sock = transport.get_extra_info("socket")
            if self._sndbuf and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # A fixed kernel send buffer (--client-sndbuf): left to autotuning, the kernel takes
                # megabytes for a reader that never reads (loopback, a proxy), all produced for
                # nobody before backpressure can see the reader is stalled.
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
                except OSError:
                    pass
        return writer

    def _transport(self) -> asyncio.Transport | None:
        return self._req.transport if self._req is not None else None

    async def send_bytes(self, data: bytes) -> None:
        """Write already-encoded events; abort the connection if the client stops reading.

        Pieces may split an event: the byte stream is the same, and the keepalive never
        writes while a send is under way.
        """
        if self.try_send(data):
            # The common case: it fits under the bound.  Nothing waited (no drain), so it needed
            # no send timeout, and the keepalive cannot have interleaved.
            return
        transport = self._transport()
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        self._sending = True
        try:
            view = memoryview(data)
            for offset in range(0, len(data), self._piece):
                piece = view[offset:offset + self._piece]
                async with asyncio.timeout(self._send_timeout):
                    while transport.get_write_buffer_size() > self._high:
                        assert self._payload_writer is not None
                        await self._payload_writer.drain()
                    if transport.is_closing():
                        raise ConnectionResetError("the client connection is closed")
                    self.peak_queued = max(self.peak_queued,
                                           transport.get_write_buffer_size() + len(piece) + _CHUNK_OVERHEAD)
                    self._last_write = asyncio.get_running_loop().time()
                    await self.write(piece)
        except TimeoutError:
            raise self._cut() from None
        finally:
            self._sending = False

    def try_send(self, data: bytes) -> bool:
        """Write ``data`` now, from any task, if it fits under the bound without waiting; else False.

        ``ConnectionResetError`` when the client has gone (the generation then drops it at once).

        The generation's producer calls this for a subscriber that is waiting (its ``sink``), so
        the common batch goes out without a task switch; ``send_bytes`` tries it first.  It is
        done synchronously: ``StreamWriter.write(drain=False)`` completes without
        suspending (no compression, no chunk-sent hook on a server response), so driving its
        coroutine by one step writes the bytes; should it ever suspend, it is closed before it
        has written anything and the caller falls back to ``send_bytes``.
        """
        transport = self._transport()
        if transport is None or transport.is_closing():
            if self.prepared:
                raise ConnectionResetError("the client connection is closed")
            return False
        writer = self._payload_writer
        if self._sending or self._eof_sent or not isinstance(writer, StreamWriter) or len(data) > self._piece:
            return False
        queued = transport.get_write_buffer_size()
        if queued > self._pause:
            return False
        step = writer.write(data, drain=False)
        try:
            step.send(None)
        except StopIteration:
            if queued + len(data) + _CHUNK_OVERHEAD > self.peak_queued:
                self.peak_queued = queued + len(data) + _CHUNK_OVERHEAD
            self._last_write = self._loop.time()
            return True
        step.close()
        return False

    async def drained(self) -> None:
        """Return once what is queued for the client is back under the pause mark.

        Bounded by the send timeout like a send: a client that takes nothing is aborted.
        """
        transport = self._transport()
        if transport is None or transport.get_write_buffer_size() <= self._pause:
            return
        try:
            async with asyncio.timeout(self._send_timeout):
                while transport.get_write_buffer_size() > self._pause:
                    if transport.is_closing():
                        raise ConnectionResetError("the client connection is closed")
                    assert self._payload_writer is not None
                    before = transport.get_write_buffer_size()
                    await self._payload_writer.drain()
                    if transport.get_write_buffer_size() >= before:
                        # drain() waits only while the protocol is paused; a transport whose
                        # buffer sits above the mark unpaused (TLS counts differently) is polled.
                        await asyncio.sleep(0.005)
        except TimeoutError:
            raise self._cut() from None

    def _cut(self) -> SlowClient:
        self._abort_transport()
        if self.metrics is not None:
            self.metrics.cut.labels("send_timeout").inc()
        return SlowClient(f"the client stopped reading; aborted with {self.peak_queued} bytes queued")

    def keepalive_due(self, now: float) -> float | None:
        """The keepalive schedule's call: write the keepalive after ``keepalive`` seconds of
        silence; when it is next due, or None once the stream is over."""
        transport = self._transport()
        if self._keepalive is None or self._eof_sent or transport is None or transport.is_closing():
            return None
        due = self._last_write + self._ping_interval
        if due > now:
            return due  # written to since: due later
        self._last_write = now
        if self._sending or transport.get_write_buffer_size():
            # Bytes are still on their way (or the client is not reading): not silence.
            return now + self._ping_interval
        try:
            sent = self.try_send(KEEPALIVE)
        except ConnectionResetError:
            return None
        if sent and self.metrics is not None:
            self.metrics.keepalives.inc()
        return now + self._ping_interval

    def stop_streaming(self) -> None:
        """No more keepalives (the handler is ending the response)."""
        if not self.prepared:
            raise RuntimeError("Response is not started")
        self._unschedule()

    def _unschedule(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    async def write_eof(self, data: bytes = b"") -> None:
        self._unschedule()
        await super().write_eof(data)


def event_stream(request: web.Request, headers: Mapping[str, str] | None = None) -> EventStream:
    """An EventStream with the app's settings (keepalive, send bounds) and metrics."""
    config = request.app[CONFIG]
    resp = EventStream(keepalive=config.keepalive, send_timeout=config.send_timeout, sndbuf=config.client_sndbuf,
                       send_buffer=config.send_buffer, headers=headers, metrics=request.app.get(METRICS))
    request[STREAM] = resp  # where relay/http/crashes.py ends it should the handler fail
    return resp


async def follow(resp: EventStream, gen: Generation, sub: Subscriber) -> bool:
    """Send the generation's log from the subscriber's position until its end.

    False when the position has left the bounded log (``ResumeExpired``).  A client that goes
    away raises ``ConnectionResetError`` (or ``SlowClient``) out of here; its subscriber leaves
    the generation already when the connection is lost (relay/http/disconnects.py).
    """
    request = resp._req
    if not isinstance(request, web.Request) or (watch := request.app.get(DISCONNECTS)) is None:
        return await _follow(resp, gen, sub)
    watch.watch(request, lambda: gen.detach(sub))
    try:
        return await _follow(resp, gen, sub)
    finally:
        watch.unwatch(request)


async def _follow(resp: EventStream, gen: Generation, sub: Subscriber) -> bool:
    sent = False
    while True:
        try:
            data = gen.read(sub)
        except ResumeExpired:
            if sent and resp.metrics is not None:
                resp.metrics.cut.labels("fell_behind").inc()
            return False
        if data:
            sent = True
            if not resp.try_send(data):
                # The client's buffer is full: while every reader is like this, the generation
                # stops reading the upstream (relay/core/generation.py, backpressure).
                gen.block(sub)
                try:
                    # Not keeping up: blocked until its queue is back under the pause mark, so
                    # what waits for it is at most that mark and one batch.
                    await resp.drained()
                    await resp.send_bytes(data)
                finally:
                    gen.unblock(sub)
        elif gen.finished:
            return True
        else:
            await gen.changed(sub)


async def serve_events(request: web.Request, resp: EventStream, stream_id: str, send: Callable[[], Awaitable[None]],
                       done: Callable[[], None] | None = None) -> web.StreamResponse:
    """Prepare ``resp`` and let ``send`` write its events; the client leaving ends it quietly (a
    client that does not take its bytes is cut and logged).  ``done`` runs however it ends."""
    try:
        await resp.prepare(request)
        await send()
    except ConnectionResetError:
        pass
    except SlowClient as exc:
        log.warning("stream %s: %s (bound %d)", stream_id, exc, request.app[CONFIG].send_buffer)
    finally:
        if done is not None:
            done()
        if resp.prepared:
            resp.stop_streaming()
    return resp
