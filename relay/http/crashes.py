"""A handler's own crash is the relay's bug: logged at ERROR with its traceback, counted, answered.

aiohttp logs a handler's exception with the same words as a request it cannot parse ("Error
handling request"), and relay/http/client_errors.py folds those into one INFO line per client
per minute, which would disguise our bug as the client's fault.  So every handler runs inside
this middleware (the outermost): an exception that is not an answer (``HTTPException``), a
cancel or a client gone is logged here with the request's method and path (never its body,
token or key), counted in ``relay_handler_errors_total``, marked as logged (so the server's
log line is not written a second time), and answered: a ``500`` in the error shape every route
uses, or, once a stream's status line went out, the view's own ``internal`` error event as its
last event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiohttp import web

from relay.core.wire import Ending
from relay.http.appkeys import CONFIG, METRICS, STREAM
from relay.http.chat_wire import internal_event
from relay.http.errors import error_response
from relay.http.openai_wire import error_body
from relay.http.responses_wire import error_event
from relay.sse import encode

log = logging.getLogger("relay.http")

#: The note a logged exception carries, so aiohttp's own line for it is not written again.
LOGGED: Final = "relay: logged as an internal error"
MESSAGE: Final = "the relay failed internally (the error is logged); try again"


@web.middleware
async def handler_crashes(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (web.HTTPException, asyncio.CancelledError, ConnectionError):
        raise  # an answer, a cancel, a client that went away: none of them a bug
    except Exception as exc:
        log.error("internal error handling %s %s", request.method, request.path, exc_info=exc)
        exc.add_note(LOGGED)
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.handler_errors.inc()
        stream: web.StreamResponse | None = request.get(STREAM)
        if stream is None or not stream.prepared:
            return error_response(500, MESSAGE, code="internal")
        try:
            await stream.write(_last_event(request))
            await stream.write_eof()
        except ConnectionError:
            pass
        return stream


def _last_event(request: web.Request) -> bytes:
    """The view's own ``internal`` error event (no id: a reconnect resumes where the client is)."""
    ending = Ending("internal", MESSAGE, retriable=True)
    if request.path.startswith("/v1/responses"):
        return error_event(ending, None)
    if request.path.startswith("/v1/"):
        return encode(error_body(ending))
    return internal_event(MESSAGE, request.app[CONFIG].retry_ms)


def logged(exc: BaseException | None) -> bool:
    """Whether ``handler_crashes`` already logged this exception."""
    return exc is not None and LOGGED in getattr(exc, "__notes__", ())
