"""Leave a generation the moment a client's connection is lost, not when its handler next runs.

aiohttp learns of a lost connection in ``RequestHandler.connection_lost`` and cancels the
handler's task; the task runs its cancellation on a later loop iteration, after every other
callback already queued.  When many clients leave at once (a page reload across a team, a load
balancer restart) those are hundreds of handlers unwinding one after another, and the last
one's upstream kept generating, and billing, until its turn came.  Here a streaming handler
registers what to do when its client goes (detach its subscriber: the generation then stops and
shuts its upstream socket within the same callback), and the server's ``connection_lost`` hook
runs it first.

The hook is installed on the ``web.Server`` instance with the others, in one order, by
relay/aiohttp_internals.py, so it is active where ``relay.run.server.start`` serves the app;
elsewhere (a test client) the handler's cancellation does the same, a step later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.web import RequestHandler

log = logging.getLogger("relay.http")


class Disconnects:
    """What to run when each watched connection is lost (one callback per connection)."""

    __slots__ = ("_on_lost",)

    def __init__(self) -> None:
        self._on_lost: dict[object, Callable[[], None]] = {}

    def watch(self, request: web.BaseRequest, callback: Callable[[], None]) -> None:
        protocol = request.protocol
        if protocol is not None:
            self._on_lost[protocol] = callback

    def unwatch(self, request: web.BaseRequest) -> None:
        self._on_lost.pop(request.protocol, None)

    def lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """A lost connection (relay/aiohttp_internals.py's hook, before aiohttp cancels the handler)."""
        callback = self._on_lost.pop(handler, None)
        if callback is not None:
            try:
                callback()
            except Exception:  # aiohttp's own clean-up after this must run whatever happens here
                log.exception("leaving a stream whose client has gone failed")
