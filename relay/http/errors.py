"""Error answers before a stream begins, in one shape everywhere.

``{"error": {"message", "type", "param", "code"}}`` is OpenAI's shape: the SDKs map it (with
the status) to their exceptions, and a person reading it on ``/chat`` gets the same message.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Mapping

from aiohttp import web

from relay.jsoncodec import dumps


#: Where a refusal's reason travels with its response, for the metrics (relay/http/guard.py counts it);
#: a typed key where aiohttp has them (3.13 and later), a plain one before.
REFUSAL: Any = web.ResponseKey("refusal", str) if hasattr(web, "ResponseKey") else "relay_refusal"


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None,
                   refusal: str | None = None) -> web.Response:
    """The error answer; ``refusal`` names why a request was refused before anything went upstream
    (``relay_requests_refused_total{reason}``): auth, origin, host, rate_limit, size, ..."""
    error_type = type_ or ("invalid_request_error" if status < 500 else "server_error")
    resp = json_response({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                         status=status, headers=headers)
    if refusal is not None:
        resp[REFUSAL] = refusal
    return resp


def store_unavailable(exc: Exception) -> web.Response:
    """The shared store cannot answer now: a retriable ``503`` (never a ``404``, which would end an
    EventSource for good)."""
    return error_response(503, str(exc), code="store_unavailable", headers={"Retry-After": "2"})


def request_refusal(status: int) -> str:
    """The refusal reason of a bad request by its status: too large, too slow, or invalid."""
    return {413: "size", 408: "timeout"}.get(status, "invalid")


def json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response`` through the one encoder (relay/jsoncodec.py)."""
    return web.Response(text=dumps(obj), status=status, headers=headers, content_type="application/json")


@web.middleware
async def openai_route_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Under ``/v1`` an unknown route is OpenAI's error object, not aiohttp's plain text: the SDKs
    parse the JSON (a ``404: Not Found`` body becomes a message nobody can act on).  A wrong method
    is already one (relay/http/guard.py)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPNotFound:
        if not _openai_path(request.path):
            raise
        return error_response(404, f"the relay serves no route {request.path}", code="unknown_url",
                              refusal="invalid")


def _openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
