"""A request's JSON body, and the one exception for a bad request.

Every rejection is a ``BadRequest`` whose message names the field and the problem, so a person
reading a 4xx knows what to change.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from relay.http.appkeys import CONFIG


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


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; BadRequest (413 past --max-body, 400 otherwise) names the problem."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body
        raise BadRequest(f"the request body is larger than the limit of {limit} bytes", status=413) from None
    return parse_json(raw)
