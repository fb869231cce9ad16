"""Error answers before a stream begins, in one shape everywhere.

``{"error": {"message", "type", "param", "code"}}`` is OpenAI's shape: the SDKs map it (with
the status) to their exceptions, and a person reading it on ``/chat`` gets the same message.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    error_type = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return web.json_response({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                             status=status, headers=headers)
