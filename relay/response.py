"""The SSE response: aiohttp-sse's EventSourceResponse with our keepalive and a bounded buffer.

aiohttp-sse gives the headers (``X-Accel-Buffering: no`` for nginx among them), the
TCP_USER_TIMEOUT that makes the kernel give up on a peer that stopped acknowledging, and the
abort of a stalled transport.  Two things it does differently from what we need:

1. Its ping writes ``": ping\\r\\n\\r\\n"`` on a fixed clock.  A comment followed by a blank
   line becomes an empty message in decoders that dispatch on a blank line once an ``id`` was
   seen (the openai SDK, httpx-sse, @microsoft/fetch-event-source).  Our ``_ping`` writes a
   single comment line, and only after ``keepalive`` seconds of silence.
2. A stalled client must not grow memory: before each write, if the bytes already queued
   plus the new ones would pass ``send_buffer``, we wait (up to ``send_timeout``) for the
   transport to drain, and abort the connection when it does not.

Each write is one ``transport.write`` of whole events, so a keepalive can never land inside
an event even though it is written from the ping task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from relay.sse import comment

KEEPALIVE = comment("keepalive")


class SlowClient(Exception):
    """The client did not take its bytes within the send timeout; the connection was aborted."""


class EventStream(EventSourceResponse):
    def __init__(self, *, keepalive: float, send_timeout: float, send_buffer: int,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(headers=headers, allow_all_methods=True, send_timeout=send_timeout,
                         ping_interval=keepalive)
        self._send_buffer = send_buffer
        self._last_write = 0.0
        # The library's default separator is CRLF; plain LF is what every decoder handles best
        # and is a byte shorter per line.
        self._sep = "\n"

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self._last_write = asyncio.get_running_loop().time()
        writer = await super().prepare(request)
        transport = request.transport
        if transport is not None:
            # Writes pause above the bound; drain() resumes us below a quarter of it.
            transport.set_write_buffer_limits(high=self._send_buffer)
        return writer

    def queued(self) -> int:
        """Bytes handed to the transport and not yet taken by the kernel."""
        transport = self._req.transport if self._req is not None else None
        return transport.get_write_buffer_size() if transport is not None else 0

    async def send_bytes(self, data: bytes) -> None:
        """Write already-encoded events; abort the connection if the client stops reading."""
        transport = self._req.transport if self._req is not None else None
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        if transport.get_write_buffer_size() and transport.get_write_buffer_size() + len(data) > self._send_buffer:
            try:
                async with asyncio.timeout(self._send_timeout):
                    assert self._payload_writer is not None
                    while transport.get_write_buffer_size() and \
                            transport.get_write_buffer_size() + len(data) > self._send_buffer:
                        await self._payload_writer.drain()
                        if transport.is_closing():
                            raise ConnectionResetError("the client connection is closed")
                        if transport.get_write_buffer_size() + len(data) > self._send_buffer:
                            # drain() returns once the protocol resumes (below a quarter of the
                            # bound), so one more pass settles it; yield to avoid a busy loop.
                            await asyncio.sleep(0)
            except TimeoutError:
                self._abort_transport()
                raise SlowClient("the client stopped reading; connection aborted") from None
        self._last_write = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self._send_timeout):
                await self.write(data)
        except TimeoutError:
            self._abort_transport()
            raise SlowClient("the client stopped reading; connection aborted") from None

    async def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._last_write + self._ping_interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            transport = self._req.transport if self._req is not None else None
            if transport is None or transport.is_closing():
                return
            if transport.get_write_buffer_size() + len(KEEPALIVE) > self._send_buffer:
                # The client is not reading; the event writer's timeout deals with it.
                self._last_write = loop.time()
                continue
            self._last_write = loop.time()
            try:
                await self.write(KEEPALIVE)
            except (ConnectionResetError, RuntimeError):
                return
