"""A request's JSON body, and the one exception for a bad request.

Every rejection is a ``BadRequest`` whose message names the field and the problem, so a person
reading a 4xx knows what to change.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from aiohttp import web

from relay.http.appkeys import CONFIG
from relay.bodies import read_bounded

#: The slowest a body may arrive beyond --body-timeout: the deadline grows by the time
#: --max-body takes at this rate, so a large allowed body on a slow link still fits.
MIN_BODY_RATE: Final = 64 * 1024


class BadRequest(ValueError):
    """The request is wrong; ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object with 'messages' or 'prompt'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def body_deadline(body_timeout: float, max_body: int) -> float:
    return body_timeout + max_body / MIN_BODY_RATE


def _too_large(max_body: int) -> BadRequest:
    return BadRequest(f"the request body is larger than the limit of {max_body} bytes", status=413)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; BadRequest (413 past --max-body, 408 when it does not arrive in
    time, 400 otherwise) names the problem."""
    config = request.app[CONFIG]
    limit = body_deadline(config.body_timeout, config.max_body)
    if (request.content_length or 0) > config.max_body:
        raise _too_large(config.max_body)
    try:
        # A body that trickles in holds a socket and a handler: it has a deadline of its own.
        # Read here, not with request.read(), which keeps the bytes in the request for as long
        # as it lives: the whole answer, for a stream (a long conversation is megabytes).
        async with asyncio.timeout(limit):
            raw = await read_bounded(request.content, config.max_body + 1)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {limit:.3g} s (--body-timeout)",
                         status=408) from None
    if len(raw) > config.max_body:
        raise _too_large(config.max_body)
    return parse_json(raw)
