"""Upstream failures: the one exception, and the mapping of HTTP error answers and error objects to it.

An upstream 401/403 is the relay's own credentials failing; its text is never passed on
(OpenAI's 401 message quotes part of the key).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import aiohttp

from relay.jsoncodec import dumps
from relay.upstream.metadata import Redactor, request_id_of, retry_after_ms_of, retry_after_of

#: How much of an error body is read: enough for any JSON error, bounded against a hostile upstream.
ERROR_BODY_LIMIT: Final = 64 * 1024


class UpstreamError(Exception):
    """The upstream failed; ``code`` is one of the /chat error codes, ``status`` its HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retriable: bool = False,
        retry_after: str | None = None,
        retry_after_ms: str | None = None,
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retriable = retriable
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id
        #: The upstream's OpenAI-shaped error object, for the /v1 pass-through (None when unsafe to pass).
        self.body = body


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes of a body, to its end (``read(n)`` alone stops at the first packet)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        data = await content.read(limit - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


async def error_from_response(resp: aiohttp.ClientResponse, *, redact: Redactor,
                              deadline: float) -> UpstreamError:
    """The UpstreamError for a non-2xx answer; its body is read until ``deadline`` (loop time)."""
    request_id = request_id_of(resp.headers, redact)
    retry_after = retry_after_of(resp.headers)
    retry_after_ms = retry_after_ms_of(resp.headers)
    status = resp.status
    if status in (401, 403):
        # The relay's own credentials failed.  Never pass the upstream's text on: OpenAI's 401
        # message quotes part of the key.
        return UpstreamError(
            "upstream_error",
            f"the upstream rejected the relay's credentials (HTTP {status}); "
            "the relay's API key or upstream configuration needs fixing",
            status=status, retriable=False, request_id=request_id,
        )
    retriable = status == 429 or status >= 500
    try:
        async with asyncio.timeout_at(deadline):
            raw = await read_bounded(resp.content, ERROR_BODY_LIMIT)
    except TimeoutError:
        return UpstreamError(
            "upstream_timeout", f"the upstream answered HTTP {status} and then sent nothing more within the timeout",
            status=status, retriable=retriable, retry_after=retry_after, retry_after_ms=retry_after_ms,
            request_id=request_id,
        )
    except (aiohttp.ClientError, ConnectionError):
        raw = b""
    obj: Any = None
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
    if isinstance(obj, dict) and obj.get("error"):
        err = error_from_body(obj, status=status, request_id=request_id, midstream=False, redact=redact)
        err.retriable, err.retry_after, err.retry_after_ms = retriable, retry_after, retry_after_ms
        return err
    reason = redact.text(resp.reason or "error", 100)
    return UpstreamError(
        "upstream_error", f"the upstream answered HTTP {status} {reason}",
        status=status, retriable=retriable, retry_after=retry_after, retry_after_ms=retry_after_ms,
        request_id=request_id,
    )


def redact_object(obj: dict[str, Any], redact: Redactor) -> dict[str, Any]:
    """``obj`` with every key of the relay's blanked, in any letter case, wherever it sits."""
    text = dumps(obj)
    if not redact.hides(text):
        return obj
    result: dict[str, Any] = json.loads(redact(text))
    return result


def error_from_body(obj: dict[str, Any], *, status: int | None, request_id: str | None,
                    midstream: bool, redact: Redactor) -> UpstreamError:
    """``{"error": {...}}`` (OpenAI), ``{"error": "text"}`` (some servers) → UpstreamError.

    The upstream's text goes on to clients of /chat and /v1 alike, so the relay's key is blanked
    here, once, for both (belt and braces: no known upstream quotes it outside a 401/403).
    """
    obj = redact_object(obj, redact)
    err = obj["error"]
    if isinstance(err, dict):
        message = str(err.get("message") or "no message")
        code = err.get("code")
        if status is None and isinstance(code, int) and 400 <= code < 600:
            status = code
        body = {"error": {"message": message, "type": err.get("type"), "param": err.get("param"),
                          "code": code}}
    else:
        message = str(err)
        body = {"error": {"message": message, "type": None, "param": None, "code": None}}
    message = redact.text(message)
    body["error"]["message"] = message
    where = "mid-answer" if midstream else f"HTTP {status}"
    return UpstreamError(
        "upstream_error", f"the upstream reported an error ({where}): {message}",
        status=status, retriable=midstream or (status is not None and (status == 429 or status >= 500)),
        request_id=request_id, body=body,
    )
