"""One streamed answer, read from aiohttp's client response: decoded, timed, paused, ended once.

Decisions (docs/architecture.md):
- **Everything that has arrived, in one step.** Each wake-up of the producer takes the whole
  buffer (``readany``), decodes it incrementally (pieces split anywhere: a UTF-8 character, a
  CRLF pair, a JSON object) and hands the batch of chunks to the generation, which writes it to
  its waiting clients in the same step.  Never ``readline()``: it splits on LF only and caps lines.
  In a burst (more already buffered after a batch) the readers run between two batches, so what
  they have not taken can pause the reading before the log outgrows its bound.
- **Backpressure is not reading.**  While every reader is full the loop waits instead of
  reading; aiohttp stops reading the socket once ``read_bufsize`` waits (relay/upstream/session.py),
  TCP holds the upstream back, and the idle and first-token clocks stop (the silence is ours).
- **One timer per answer**, not an ``asyncio.timeout`` per read: every delta moves the idle
  deadline, so the timer is re-armed only when it fires early.  A deadline that passes fails the
  read in progress (``StreamReader.set_exception``, public).
- **A clean end gives the connection back; anything else closes it.**  After the last event the
  rest of the body (the chunked terminator, usually already here) is read so aiohttp returns the
  connection to its pool: the next answer pays no TCP or TLS handshake.  A cancel, a failure or a
  timeout closes the connection at once, never drains it: closing is what stops the billing.
- EOF after a ``finish_reason`` counts as finished (some servers omit ``[DONE]``); EOF before one
  is ``upstream_ended``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from relay.config import Config
from relay.sse import EventTooLarge, SSEDecoder
from relay.upstream.chunks import CHAT, Chunk, Parser
from relay.upstream.errors import UpstreamError
from relay.upstream.metadata import Redactor, request_id_of

#: After an answer's last event, how much more of its body is read to reuse its connection, and
#: for how long; past either the connection is closed instead.
DRAIN_BYTES: Final = 64 * 1024
DRAIN_SECONDS: Final = 2.0
#: A read at least this large is taken as part of a burst (a steady stream's pieces are an
#: event or a few, hundreds of bytes): the readers run before the next read.
BURST: Final = 8 * 1024
#: The most of one read handed over at once (see ``run``).
SLICE: Final = 64 * 1024

#: Clean ends still reading their body's last bytes (a task must be referenced until done).
_draining: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class Target:
    """Where one upstream is and how to talk to it: from configuration only, never from a client."""

    name: str
    base_url: str
    api_key: str | None
    api_key_header: str
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]
    connect_timeout: float
    first_token_timeout: float
    idle_timeout: float


class _Deadline(Exception):
    """Failed into the read in progress when a timeout passes (``UpstreamResponse._on_timer``)."""


class UpstreamResponse(Parser):
    """One streamed answer.  ``run(on_chunks)`` hands each batch of chunks to ``on_chunks`` as it
    arrives and returns at the end of the answer, or raises its UpstreamError."""

    __slots__ = ("_clean", "_decoder", "_first_deadline", "_first_token_timeout", "_idle", "_last_delta",
                 "_loop", "_paused_at", "_reading", "_resp", "_resume", "_stopped", "_timer", "_total_deadline",
                 "_total_timeout", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, config: Config, target: Target, attempt_started: float,
                 total_deadline: float, redact: Redactor, api: str = CHAT) -> None:
        self._resp = resp
        self._decoder = SSEDecoder(max_event_size=config.max_upstream_event, error_field=True)
        self._idle = target.idle_timeout
        self._first_token_timeout = target.first_token_timeout
        self._first_deadline = attempt_started + target.first_token_timeout
        self._total_timeout = config.total_timeout
        self._total_deadline = total_deadline
        #: When the last delta (content, reasoning, a tool call, the finish) arrived; None: none yet.
        #: The idle timeout counts from here, not from the last byte: comments and a trickle of
        #: bytes that never make an event do not keep a stream alive.
        self._last_delta: float | None = None
        #: Reading is over (the answer's last event, EOF, a failure, or closed).
        self._stopped = False
        #: The answer ended as the protocol says: its connection may serve the next one.
        self._clean = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        #: Reading (not paused for backpressure): only then do the deadlines run.
        self._reading = False
        self._paused_at = 0.0
        #: Set while paused: resolved by ``resume()``.
        self._resume: asyncio.Future[None] | None = None
        self.status = resp.status
        self.headers = resp.headers
        # The events as chunks, and what the answer has said of itself (finish_reason, usage,
        # response_id, failure): relay/upstream/chunks.py's Parser, which this extends.
        super().__init__(api, redact, request_id_of(resp.headers, redact))

    async def run(self, on_chunks: Callable[[list[Chunk]], None]) -> None:
        """Deliver the answer's chunks to ``on_chunks`` until its end; UpstreamError for a failure."""
        content = self._resp.content
        self._reading = True
        self._arm(self._deadline())
        try:
            while not self._stopped:
                if self._resume is not None:
                    await self._resume
                try:
                    data = await content.readany()
                except _Deadline:
                    raise self._timeout_error(self._loop.time()) from None
                except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                    # ClientPayloadError: a broken framing or coding; RuntimeError: aiohttp's
                    # "Connection closed".  Every failure of the read is this one honest end.
                    raise UpstreamError("upstream_ended", "the upstream connection broke before the answer was finished",
                                        retriable=True, request_id=self.request_id, failover=True) from exc
                if not data:
                    self._stopped = True
                    if self.finish_reason is None:
                        raise UpstreamError("upstream_ended",
                                            "the upstream ended the stream before the answer was finished",
                                            retriable=True, request_id=self.request_id, failover=True)
                    self._clean = True
                    return
                for start in range(0, len(data), SLICE):
                    if start:
                        # One read can be megabytes (an older aiohttp inflates a compressed body
                        # whole): it is handed over a slice at a time, each after the readers
                        # have taken the last (or made room), so the backpressure holds in it too.
                        if self._resume is not None:
                            await self._resume
                        else:
                            await asyncio.sleep(0)
                        if self._stopped:
                            break
                    self._deliver(data[start:start + SLICE] if len(data) > SLICE else data, on_chunks)
                if self._stopped:
                    break
                if len(data) >= BURST and self._resume is None:
                    # A burst (or a compressed body inflating as reads make room): more is likely
                    # buffered, and readany() would hand it over without letting the readers run.
                    # They run first: what they have not yet taken is what pauses the reading, so
                    # a burst of any size is paced by them.  A steady stream's pieces are far
                    # smaller and pay nothing for this.
                    await asyncio.sleep(0)
                if self._reading:
                    timer = self._timer
                    deadline = self._deadline()
                    if timer is None or timer.when() > deadline:
                        self._arm(deadline)
            self._clean = True  # [DONE]
        finally:
            self._stopped = True
            self._reading = False
            self._stop()

    def _deliver(self, data: bytes, on_chunks: Callable[[list[Chunk]], None]) -> None:
        """Decode, parse and hand over what ``data`` completes."""
        try:
            events = self._decoder.feed(data)
        except EventTooLarge as exc:
            raise UpstreamError("upstream_error", f"the upstream sent an oversized event: {exc}",
                                retriable=False, request_id=self.request_id) from None
        chunks: list[Chunk] = []
        failure: UpstreamError | None = None
        try:
            if self.parse(events, chunks):
                self._last_delta = self._loop.time()
        except UpstreamError as exc:
            failure = exc  # after the chunks before it in the same read, which are delivered
        if self.ended:
            self._stopped = True
        if chunks:
            on_chunks(chunks)
            del chunks  # not held through the next read (idle streams' memory)
        if failure is not None:
            raise failure

    # -- backpressure ----------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading after this batch (every reader is full): its clocks stop meanwhile."""
        if not self._reading or self._stopped:
            return
        self._reading = False
        self._paused_at = self._loop.time()
        self._resume = self._loop.create_future()

    def resume(self) -> None:
        waiter = self._resume
        if waiter is None or self._stopped:
            return
        self._resume = None
        # The pause was the relay's silence, not the upstream's: the idle and first-token
        # deadlines move by it (the total deadline does not).
        paused = self._loop.time() - self._paused_at
        if self._last_delta is not None:
            self._last_delta += paused
        self._first_deadline += paused
        self._reading = True
        self._arm(self._deadline())
        if not waiter.done():
            waiter.set_result(None)

    # -- deadlines -------------------------------------------------------------------------

    def _deadline(self) -> float:
        if self._last_delta is not None:
            return min(self._last_delta + self._idle, self._total_deadline)
        return min(self._first_deadline, self._total_deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading or self._stopped:
            return
        deadline = self._deadline()
        if self._loop.time() >= deadline:
            self._resp.content.set_exception(_Deadline())
        else:
            self._arm(deadline)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout_error(self, now: float) -> UpstreamError:
        failover = False
        if now >= self._total_deadline:
            phase, msg = "total", f"the answer did not finish within the total timeout ({self._total_timeout:g} s)"
        elif self._last_delta is None:
            phase = "first_token"
            msg = f"the upstream sent no answer within the first-token timeout ({self._first_token_timeout:g} s)"
            failover = True
        else:
            phase, msg = "idle", f"the upstream went silent for longer than the idle timeout ({self._idle:g} s)"
        return UpstreamError("upstream_timeout", msg, retriable=True, request_id=self.request_id, failover=failover,
                             timeout=phase)

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """The answer is over: a clean end gives its connection back (relay/upstream/session.py's pool),
        anything else closes it (never drained: that would let the upstream keep generating)."""
        self._stop()
        self._stopped = True
        resp = self._resp
        if self._clean:
            self._clean = False
            release(resp)
        else:
            resp.close()

    def shutdown(self) -> None:
        """Tell the upstream now, before ``close()``: ``transport.close()`` leaves the socket open
        until the loop's next iteration, which is many milliseconds away when hundreds of clients
        left at once, and the upstream generates (and bills) until its connection closes."""
        self._clean = False
        connection = self._resp.connection
        if connection is not None and connection.transport is not None:
            shutdown_now(connection.transport)


def release(resp: aiohttp.ClientResponse) -> None:
    """Give a cleanly ended answer's connection back to the pool: at once when its body has been
    read to the end (aiohttp has already done so), else after reading what is left of it, bounded."""
    if resp.content.is_eof() or resp.connection is None:
        resp.release()
        return
    task = asyncio.get_running_loop().create_task(_drain(resp))
    _draining.add(task)
    task.add_done_callback(_draining.discard)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    content = resp.content
    read = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while read <= DRAIN_BYTES and (data := await content.readany()):
                read += len(data)
    except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
        pass
    finally:
        if content.is_eof() and read <= DRAIN_BYTES:
            resp.release()
        else:
            resp.close()


def shutdown_now(transport: asyncio.BaseTransport) -> None:
    """Send the peer our FIN at once (``shutdown``), whatever the transport does with the socket later.

    The transport's own socket object may refuse ``shutdown`` (uvloop's does), so a second Python
    socket object is made on the same descriptor and detached again, never closed.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        fd = sock.fileno()
        if fd < 0:
            return
        raw = socket.socket(sock.family, sock.type, 0, fd)
    except (OSError, ValueError, AttributeError):
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    finally:
        raw.detach()
