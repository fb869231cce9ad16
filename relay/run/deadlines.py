"""The request-head deadline (``--header-timeout``): a new connection's first request line and
headers must be in within it, or the connection gets ``408`` and is closed.

Counted from the connection's start and ended when a handler starts (the head was parsed).
Later requests on a kept-alive connection are bounded by ``--keepalive-idle``, which aiohttp
counts from each answer and which closes a connection whose next head is not complete by then
(silently: there is no request to answer).  Each client's misses are logged at most once a
minute, with how many were folded into the line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relay.http.client_errors import OncePerClient
from relay.jsoncodec import dumps
from relay.run.connections import peer_address

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger("relay.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HeaderDeadline:
    def __init__(self, timeout: float, metrics: Metrics | None = None) -> None:
        self.timeout = timeout
        self._metrics = metrics
        #: Connections closed because their first request head was late.
        self.missed = 0
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._lines = OncePerClient()
        body = dumps({"error": {"message": f"the request head did not arrive within {timeout:g} s "
                                           "(--header-timeout)", "type": "invalid_request_error",
                                "param": None, "code": "request_timeout"}}).encode()
        self._answer = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    def end_with_handlers(self, app: web.Application) -> None:
        """A handler starting means its head was parsed: the deadline ends (``app`` not yet frozen)."""
        @web.middleware
        async def head_arrived(request: web.Request, handler: Handler) -> web.StreamResponse:
            protocol = request.protocol
            if isinstance(protocol, RequestHandler):
                self._cancel(protocol)
            return await handler(request)

        app.middlewares.insert(0, head_arrived)

    def install(self, server: web.Server) -> None:
        """Arm the deadline for every new connection of ``server``."""
        made, lost = server.connection_made, server.connection_lost
        loop = asyncio.get_running_loop()

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if not transport.is_closing():  # (refused by the connection limits: already closed)
                self._timers[handler] = loop.call_later(self.timeout, self._expire, handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            self._cancel(handler)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _cancel(self, handler: RequestHandler) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._timers.pop(handler, None)
        if transport.is_closing():
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
