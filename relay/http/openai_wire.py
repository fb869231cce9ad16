"""The ``/v1`` view's wire format: the upstream's chunks as sent, and OpenAI's error shapes.

Each upstream event's ``data`` string goes out byte-identical, re-framed as ``data: …`` and a
blank line; ``data: [DONE]`` follows only when the upstream finished.  A failure is OpenAI's
error object (``{"error": {...}}``), in-stream once the status line is out, else as the
response's status and body.  Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from relay.core.wire import Ending
from relay.http.errors import json_response
from relay.jsoncodec import dumps
from relay.sse import encode
from relay.upstream.chunks import Chunk
from relay.upstream.errors import UpstreamError

DONE: Final = encode("[DONE]")


class OpenAIWire:
    __slots__ = ("_drop_usage",)
    api = "chat"
    upstream: str | None = None
    alias: str | None = None

    def __init__(self, *, drop_usage: bool) -> None:
        # Only the usage chunk the relay itself asked for is removed.
        self._drop_usage = drop_usage

    def start(self, stream_id: str) -> None:
        return None

    def chunk(self, chunk: Chunk, seq: int) -> bytes | None:
        if self._drop_usage and not chunk.delta:
            obj = chunk.obj
            if not obj.get("choices") and obj.get("usage"):
                return None
        return encode(chunk.data)

    def end(self, ending: Ending, seq: int) -> bytes:
        if ending.code == "done":
            return DONE
        return encode(error_body(ending))


def error_body(ending: Ending) -> str:
    """The error JSON for how a generation failed: the upstream's own as it sent it, when it sent
    one (relay/upstream/errors.py), else OpenAI's shape with the relay's code."""
    exc = ending.error
    if exc is not None and exc.raw is not None and exc.status not in (401, 403):
        return exc.raw
    return dumps({"error": {"message": ending.message, "type": "server_error", "param": None,
                            "code": ending.code}})


def failure_response(ending: Ending) -> web.Response:
    """A failure before the status line went out, as the status and body an OpenAI SDK expects."""
    exc = ending.error
    if exc is None:
        if ending.code == "shutdown":
            # The SDKs retry a 503 (after Retry-After): the next process answers.
            return json_response({"error": {"message": "the relay is shutting down; retry the request",
                                            "type": "server_error", "param": None, "code": "shutdown"}},
                                 status=503, headers={"Retry-After": "1"})
        return _json(error_body(ending), status=500 if ending.code == "internal" else 499)
    return upstream_error_response(exc, ending)


def upstream_error_response(exc: UpstreamError, ending: Ending) -> web.Response:
    status = exc.status
    if status in (401, 403):
        # relay/upstream already replaced the upstream's text with one about the relay's credentials.
        body = {"error": {"message": exc.message, "type": "server_error", "param": None,
                          "code": "upstream_auth_failed"}}
        status = 502
        return json_response(body, status=status, headers=_passed_headers(exc))
    if status is None or not 400 <= status < 600:
        status = 504 if exc.code == "upstream_timeout" else 502
    return _json(error_body(ending), status=status, headers=_passed_headers(exc))


def _passed_headers(exc: UpstreamError) -> dict[str, str]:
    headers = {name: value for name, value in (("retry-after", exc.retry_after),
                                               ("retry-after-ms", exc.retry_after_ms),
                                               ("x-request-id", exc.request_id)) if value}
    # How many upstreams were tried (relay/upstream/pool.py); this answer is the last one's.
    headers["x-relay-attempts"] = str(exc.attempts)
    return headers


def _json(text: str, *, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, headers=headers, content_type="application/json")


