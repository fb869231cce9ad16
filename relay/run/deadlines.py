"""The request-head deadline (``--header-timeout``): a request line and headers must be in within
it, or the connection gets ``408`` and is closed.

A new connection's first head is timed from the connection's start.  A later head on a kept-alive
connection is timed from its first byte (as nginx times ``client_header_timeout``), but no later
than the moment aiohttp's ``--keepalive-idle`` would close the connection silently: a client that
has begun a request is owed an answer, one that sent nothing is not (a ``408`` on an idle
connection races the client's next request).  The deadline ends when the head is parsed.  Each
client's misses are logged at most once a minute, with how many were folded into the line.

aiohttp exposes none of this, so the deadline watches the connection's request parser (a thin
wrapper on it) and reads whether the connection waits for its next request and when aiohttp's
keep-alive closes it: aiohttp's private members, all through relay/aiohttp_internals.py (which
says why each); tests/test_connections.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from aiohttp.web import RequestHandler

from relay.aiohttp_internals import keepalive_close_time, replace_request_parser, request_parser, waits_for_a_request
from relay.logthrottle import OncePerClient
from relay.jsoncodec import dumps
from relay.run.connections import peer_address

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger("relay.http")

#: How much before aiohttp's silent keep-alive close a late head is answered instead.
_BEFORE_KEEPALIVE_CLOSE = 0.005


class _HeadWatch:
    """The connection's request parser, telling the deadline when a head begins and when it is in."""

    __slots__ = ("_deadline", "_handler", "_parser", "_payload", "_transport")

    def __init__(self, parser: Any, deadline: HeaderDeadline, handler: RequestHandler,
                 transport: asyncio.Transport) -> None:
        self._parser = parser
        self._deadline = deadline
        self._handler = handler
        self._transport = transport
        #: The last request's body: bytes that arrive before it ended are more of it, not a head.
        self._payload: Any = None

    def feed_data(self, data: bytes) -> Any:
        try:
            result = self._parser.feed_data(data)
        except Exception:
            self._deadline.disarm(self._handler)  # aiohttp answers the malformed head itself (400)
            raise
        messages = result[0]
        if messages:
            self._deadline.disarm(self._handler)
            self._payload = messages[-1][1]
        elif data and (self._payload is None or self._payload.is_eof()):
            self._deadline.head_begun(self._handler, self._transport)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class HeaderDeadline:
    def __init__(self, timeout: float, metrics: Metrics | None = None, *, keepalive_idle: float = math.inf) -> None:
        self.timeout = timeout
        #: aiohttp's keep-alive timeout (``--keepalive-idle``): it closes a connection silently
        #: that long after its start or its last answer, head or no head.
        self._keepalive_idle = keepalive_idle
        self._metrics = metrics
        #: Connections closed because a request head was late.
        self.missed = 0
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._lines = OncePerClient()
        body = dumps({"error": {"message": f"the request head did not arrive within {timeout:g} s "
                                           "(--header-timeout)", "type": "invalid_request_error",
                                "param": None, "code": "request_timeout"}}).encode()
        self._answer = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    def made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """A new connection (relay/aiohttp_internals.py's hook): its first head is due from now."""
        if transport.is_closing():  # (refused by the connection limits: already closed)
            return
        self._arm(handler, transport, asyncio.get_running_loop().time())
        replace_request_parser(handler, _HeadWatch(request_parser(handler), self, handler, transport))

    def lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.disarm(handler)

    def head_begun(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if handler not in self._timers:  # (the first head is timed from the connection's start)
            self._arm(handler, transport, asyncio.get_running_loop().time())

    def _arm(self, handler: RequestHandler, transport: asyncio.Transport, started: float,
             when: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        if when is None:
            # Bytes of the next head can arrive before aiohttp has moved its close past the
            # answer just sent: a close time already past is not this head's (_expire looks again).
            silent = self._silent_close(handler, started)
            when = min(started + self.timeout, silent) if silent > loop.time() else started + self.timeout
        self._timers[handler] = loop.call_at(when, self._expire, handler, transport, started)

    def _silent_close(self, handler: RequestHandler, started: float) -> float:
        """Just before aiohttp's keep-alive closes the connection, which it does silently, head or no head."""
        close = keepalive_close_time(handler) or math.inf  # (0: not armed yet)
        return min(close, started + self._keepalive_idle) - _BEFORE_KEEPALIVE_CLOSE

    def disarm(self, handler: RequestHandler) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, handler: RequestHandler, transport: asyncio.Transport, started: float) -> None:
        self._timers.pop(handler, None)
        if transport.is_closing() or not waits_for_a_request(handler):
            return  # (or a head pipelined behind a response still running: aiohttp times it from that answer)
        # Waiting for a request, aiohttp has moved its close past the last answer: it is this head's.
        when = min(started + self.timeout, self._silent_close(handler, started))
        if when > asyncio.get_running_loop().time():
            self._arm(handler, transport, started, when)
            return
        self.missed += 1
        if self._metrics is not None:
            self._metrics.deadlines_missed.labels("header").inc()
        transport.write(self._answer)
        transport.close()
        addr = peer_address(transport.get_extra_info("peername"))
        folded = self._lines.due(addr)
        if folded is not None:
            log.info("closed a connection from %s: its request head did not arrive within %g s (--header-timeout)%s",
                     addr, self.timeout, f" ({folded} more since the last line)" if folded else "")
