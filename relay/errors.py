"""Error answers before a stream begins, in one shape everywhere.

``{"error": {"message", "type", "param", "code"}}`` is OpenAI's shape: the SDKs map it (with
the status) to their exceptions, and a person reading it on ``/chat`` gets the same message.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.keys import CONFIG
from relay.validation import BadRequest, parse_json


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    error_type = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return web.json_response({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                             status=status, headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; BadRequest (413 past --max-body, 400 otherwise) names the problem."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body
        raise BadRequest(f"the request body is larger than the limit of {limit} bytes", status=413) from None
    return parse_json(raw)
