"""Starting a generation for a request, the same for both views: the client's slot, the cap.

The client's slot (``--max-streams-per-client``) is held while the generation runs, whoever is
attached to it; the live cap (``--max-streams``) is the registry's.  A refusal is answered
before anything is sent upstream, in one shape for both views.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.core.generation import Generation
from relay.core.registry import StreamLimit
from relay.core.wire import Wire
from relay.http import access
from relay.http.appkeys import ACCESS, LIMITS, REGISTRY
from relay.http.errors import error_response
from relay.http.ratelimit import TooManyStreams

#: Why a new generation may be refused (besides a bad request, which each view checks itself).
Refused = (StreamLimit, TooManyStreams)


async def start_generation(request: web.Request, *, kind: str, model: str, body: dict[str, Any], wire: Wire,
                           resumable: bool, streaming: bool = True,
                           wait_for_subscriber: float | None = None, background: bool = False) -> Generation:
    """A started generation owned by this request's client; raises one of ``Refused``."""
    client = access.client_of(request)
    release = await request.app[LIMITS].acquire(client.identity)
    try:
        gen = request.app[REGISTRY].create(kind=kind, model=model, body=body, wire=wire, resumable=resumable,
                                           streaming=streaming, wait_for_subscriber=wait_for_subscriber,
                                           owner=client.owner, background=background)
    except BaseException:
        release()
        raise
    gen.client = access.client_address(request, request.app[ACCESS].trusted)
    assert gen.task is not None
    gen.task.add_done_callback(lambda _task: release())
    return gen


def refusal(exc: Exception) -> web.Response:
    """The answer to a request whose generation was refused."""
    if isinstance(exc, TooManyStreams):
        # 429: the SDKs raise RateLimitError (and wait Retry-After before their own retries).
        return error_response(429, str(exc), code="rate_limit_exceeded", type_="requests",
                              headers={"Retry-After": "5"}, refusal="client_streams")
    return error_response(503, str(exc), headers={"Retry-After": "5"}, refusal="stream_limit")
