"""The SSE response: aiohttp's StreamResponse with the SSE headers, our keepalive and a bounded buffer.

Why not aiohttp-sse's ``EventSourceResponse`` (which it was built on until its every use had
gone): its ``prepare`` starts a ping task per response, where one schedule per event loop writes
every keepalive (relay/http/keepalive.py); its ping writes ``": ping\\r\\n\\r\\n"`` on a fixed
clock, and a comment followed by a blank line becomes an empty message in decoders that dispatch
on a blank line once an ``id`` was seen (the openai SDK, httpx-sse,
@microsoft/fetch-event-source), where ours is one comment line after ``keepalive`` seconds of
silence; its ``send`` encodes one event from strings, where the relay writes events already
encoded, many at once.  What was left of it (four headers, TCP_USER_TIMEOUT, an abort) was
reached through its private helpers; it is a few lines here, with the socket API.

- A stalled client must not grow memory: bytes queued for it never pass ``send_buffer``; when
  the client takes nothing for ``send_timeout`` the connection is aborted.  TCP_USER_TIMEOUT
  makes the kernel give up on a peer that stopped acknowledging as soon (Linux).
- The keepalive is never written while a send is under way, so it can never land inside an event.
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

from relay.aiohttp_internals import write_now
from relay.core.eventlog import ResumeExpired
from relay.core.fanout import Subscriber
from relay.core.generation import Generation
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
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)  # (Linux only)
#: What makes a response an event stream, for browsers, SDKs and proxies (nginx reads the last).
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
               "X-Accel-Buffering": "no"}


class SlowClient(Exception):
    """The client did not take its bytes within the send timeout; the connection was aborted."""


class EventStream(web.StreamResponse):
    def __init__(self, *, keepalive: float, send_timeout: float, send_buffer: int, sndbuf: int = 0,
                 headers: Mapping[str, str] | None = None, metrics: Metrics | None = None) -> None:
        super().__init__()
        if headers is not None:
            self.headers.extend(headers)
        self.headers.update(SSE_HEADERS)
        self._interval = keepalive
        self._send_timeout = send_timeout
        self._request: web.BaseRequest | None = None
        self._writer: AbstractStreamWriter | None = None
        self._ended = False
        #: The client socket whose TCP_USER_TIMEOUT was set, and what it was before (restored at the end).
        self._user_timeout: tuple[socket.socket, int] | None = None
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
        self._request = request
        transport = request.transport
        # The client's TCP socket (None on a unix socket): both socket options below are TCP's.
        sock: socket.socket | None = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock = None
        if sock is not None:
            self._set_user_timeout(sock)
        writer = self._writer = await super().prepare(request)
        self.enable_chunked_encoding()  # (as before: HTTP/1.1 is chunked by then; HTTP/1.0 is not refused)
        self._keepalive = Keepalives.of(self._loop).add(self, self._last_write + self._interval)
        if transport is not None:
            # Above the mark the protocol pauses; drain() waits until it is resumed (a quarter of it).
            transport.set_write_buffer_limits(high=self._pause)
            if self._sndbuf and sock is not None:
                # A fixed kernel send buffer (--client-sndbuf): left to autotuning, the kernel takes
                # megabytes for a reader that never reads (loopback, a proxy), all produced for
                # nobody before backpressure can see the reader is stalled.
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
                except OSError:
                    pass
        return writer

    def _set_user_timeout(self, sock: socket.socket) -> None:
        """Ask the kernel to abort the connection when what was sent stays unacknowledged for
        ``send_timeout``: a hung peer is found at the first unacknowledged write (a keepalive),
        not when enough has queued for the send bound (days, for a slow stream)."""
        if _TCP_USER_TIMEOUT is None:
            return
        try:
            before = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self._send_timeout * 1000))
        except OSError:
            return
        self._user_timeout = (sock, before)

    def _restore_user_timeout(self) -> None:
        """A kept-alive connection's next response is not an event stream: its timeout as it was."""
        if self._user_timeout is None or _TCP_USER_TIMEOUT is None:
            return
        sock, before = self._user_timeout
        self._user_timeout = None
        if sock.fileno() >= 0:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, before)
            except OSError:
                pass

    def _transport(self) -> asyncio.Transport | None:
        return self._request.transport if self._request is not None else None

    @property
    def request(self) -> web.BaseRequest | None:
        """The request this response answers, once prepared."""
        return self._request

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
                        assert self._writer is not None
                        await self._writer.drain()
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
        writer = self._writer
        if self._sending or self._ended or not isinstance(writer, StreamWriter) or len(data) > self._piece:
            return False
        queued = transport.get_write_buffer_size()
        if queued > self._pause:
            return False
        if not write_now(writer, data):
            return False
        if queued + len(data) + _CHUNK_OVERHEAD > self.peak_queued:
            self.peak_queued = queued + len(data) + _CHUNK_OVERHEAD
        self._last_write = self._loop.time()
        return True

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
                    assert self._writer is not None
                    before = transport.get_write_buffer_size()
                    await self._writer.drain()
                    if transport.get_write_buffer_size() >= before:
                        # drain() waits only while the protocol is paused; a transport whose
                        # buffer sits above the mark unpaused (TLS counts differently) is polled.
                        await asyncio.sleep(0.005)
        except TimeoutError:
            raise self._cut() from None

    def _cut(self) -> SlowClient:
        # A stalled peer never drains the write buffer, so a graceful close would wait forever.
        transport = self._transport()
        if transport is not None:
            transport.abort()
        if self.metrics is not None:
            self.metrics.cut.labels("send_timeout").inc()
        return SlowClient(f"the client stopped reading; aborted with {self.peak_queued} bytes queued")

    def keepalive_due(self, now: float) -> float | None:
        """The keepalive schedule's call: write the keepalive after ``keepalive`` seconds of
        silence; when it is next due, or None once the stream is over."""
        transport = self._transport()
        if self._keepalive is None or self._ended or transport is None or transport.is_closing():
            return None
        due = self._last_write + self._interval
        if due > now:
            return due  # written to since: due later
        self._last_write = now
        if self._sending or transport.get_write_buffer_size():
            # Bytes are still on their way (or the client is not reading): not silence.
            return now + self._interval
        try:
            sent = self.try_send(KEEPALIVE)
        except ConnectionResetError:
            return None
        if sent and self.metrics is not None:
            self.metrics.keepalives.inc()
        return now + self._interval

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
        self._ended = True
        await super().write_eof(data)
        self._restore_user_timeout()


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
    request = resp.request
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
