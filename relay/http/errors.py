"""Error answers before a stream begins, in one shape everywhere.

``{"error": {"message", "type", "param", "code"}}`` is OpenAI's shape: the SDKs map it (with
the status) to their exceptions, and a person reading it on ``/chat`` gets the same message.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Mapping

from aiohttp import web

from relay.jsoncodec import dumps


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    error_type = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return json_response({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                         status=status, headers=headers)


def json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response`` through the one encoder (relay/jsoncodec.py)."""
    return web.Response(text=dumps(obj), status=status, headers=headers, content_type="application/json")
