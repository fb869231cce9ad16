"""Every use the relay makes of aiohttp's private members, in one place, each with its reason.

aiohttp's public API has no hook for what these do; each is read or replaced here and nowhere
else, without a ``getattr`` default (a rename in aiohttp must fail loudly, not switch a feature
off), and tests/test_aiohttp_internals.py checks each one on a real server and connection, so an
aiohttp upgrade that changes one fails there by name.  The project supports the aiohttp range in
setup.cfg; CI runs the whole suite on its lowest and highest versions (.ci/run).

- ``web.Server.connection_made`` / ``connection_lost`` (instance attributes replaced): the only
  place a connection is seen before any request on it, and lost before aiohttp cancels the
  handler.  ``ConnectionHooks`` replaces them once, with the callbacks in one documented order.
- ``RequestHandler._parser``: the request-head deadline (relay/run/deadlines.py) wraps the
  connection's parser to see a head begin and end; aiohttp times only the gap between requests.
- ``RequestHandler._waiter`` and ``_messages``: whether a kept-alive connection waits for its
  next request (the deadline then owes the client a 408, not an answer mid-request).
- ``RequestHandler._next_keepalive_close_time``: when aiohttp will close a kept-alive connection
  silently (a late head is answered just before, rather than raced).
- ``StreamWriter.write`` driven by one ``send(None)``: the SSE response writes a batch from the
  producer's own step with no task switch (relay/http/sse_response.py); ``write(drain=False)``
  does not suspend on a server response, and if it ever does the step is closed unwritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http import StreamWriter
from aiohttp.web_protocol import RequestHandler

Made = Callable[[RequestHandler, asyncio.Transport], None]
Lost = Callable[[RequestHandler, "BaseException | None"], None]


def install_connection_hooks(server: web.Server, *, made: Sequence[Made] = (), before_lost: Sequence[Lost] = (),
                             after_lost: Sequence[Lost] = ()) -> None:
    """Run ``made`` after aiohttp's own ``connection_made``, in order; ``before_lost`` before
    aiohttp's own ``connection_lost`` (which cancels the handler), then ``after_lost``.

    The one order every caller relies on (relay/run/server.py): the connection limits close a
    refused connection first, then the head deadline arms (and skips a closed one); a lost
    connection leaves its stream first (the upstream closes in that same callback), aiohttp
    cleans up, then the deadline and the connection count forget it.
    """
    own_made, own_lost = server.connection_made, server.connection_lost

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        own_made(handler, transport)
        for hook in made:
            hook(handler, transport)

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        try:
            for hook in before_lost:
                hook(handler, exc)
        finally:
            own_lost(handler, exc)  # aiohttp's own clean-up runs whatever a hook did
        for hook in after_lost:
            hook(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


def request_parser(handler: RequestHandler) -> Any:
    """The connection's HTTP request parser (``feed_data(data) -> (messages, upgraded, tail)``)."""
    return handler._parser


def replace_request_parser(handler: RequestHandler, parser: Any) -> None:
    handler._parser = parser


def waits_for_a_request(handler: RequestHandler) -> bool:
    """Between requests: aiohttp awaits the next message and none is queued (no response is running)."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done() and not handler._messages


def keepalive_close_time(handler: RequestHandler) -> float:
    """The loop time aiohttp closes a kept-alive connection silently at; 0 while it is not armed."""
    return float(handler._next_keepalive_close_time)


def write_now(writer: StreamWriter, data: bytes) -> bool:
    """Write ``data`` to a prepared response's writer now, without suspending; False (nothing
    written) should aiohttp's write ever need to wait."""
    step = writer.write(data, drain=False)
    try:
        step.send(None)
    except StopIteration:
        return True
    step.close()
    return False
