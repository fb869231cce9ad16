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


def request_refusal(status: int) -> str:
    """The refusal reason of a bad request by its status: too large, too slow, or invalid."""
    return {413: "size", 408: "timeout"}.get(status, "invalid")


def json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response`` through the one encoder (relay/jsoncodec.py)."""
    return web.Response(text=dumps(obj), status=status, headers=headers, content_type="application/json")
