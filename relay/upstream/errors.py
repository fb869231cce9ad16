"""Upstream failures: the one exception, and the mapping of HTTP error answers and error objects to it.

An upstream's error object is carried, not rebuilt: ``/v1`` passes its JSON text on as sent
(``raw``: keys and values intact, only the relay's own key blanked), ``/chat`` keeps its own
event shape and adds the upstream's type, code and extra fields (``upstream``, bounded).
A body that is not JSON, or larger than the read bound, gets the relay's own error instead.
An upstream 401/403 is the relay's own credentials failing; its text is never passed on
(OpenAI's 401 message quotes part of the key).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final


from relay.jsoncodec import dumps
from relay.upstream.metadata import Redactor, request_id_of, retry_after_ms_of, retry_after_of

#: How much of an error body is read: enough for any JSON error, bounded against a hostile upstream.
ERROR_BODY_LIMIT: Final = 64 * 1024
#: Bounds on what /chat's error event carries of the upstream's error object.
DETAIL_LIMIT: Final = 4096
DETAIL_STRING: Final = 1000
#: The fields of an error object that /chat's event names itself (the rest is ``detail``).
NAMED: Final = frozenset({"message", "type", "code", "param"})
#: Statuses after which another upstream is tried (if nothing has reached the client yet): the
#: upstream is busy, overloaded or broken.  Never 400, 404, 413, 422: the request is at fault.
FAILOVER_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529})
#: The upstream's credentials or credit are broken: fail over and leave it alone for longer.
DOWN_STATUSES: Final = frozenset({401, 402, 403})


def fails_over(status: int | None) -> bool:
    """Whether an error with this HTTP status (None: a broken connection or stream) is the upstream's fault."""
    return status is None or status in FAILOVER_STATUSES or status in DOWN_STATUSES or 300 <= status < 400


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
        raw: str | None = None,
        upstream: dict[str, Any] | None = None,
        failover: bool = False,
        timeout: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retriable = retriable
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id
        #: The upstream's error JSON as sent (the relay's key blanked), for /v1 to pass on;
        #: None when the relay speaks for itself (not JSON, too large, a 401/403, a timeout).
        self.raw = raw
        #: The upstream's ``type``, ``code`` and other fields, bounded, for /chat's error event.
        self.upstream = upstream
        #: Another upstream may be tried instead (relay/upstream/pool.py), if nothing was relayed yet.
        self.failover = failover
        #: How many upstreams were tried for the request before it failed with this.
        self.attempts = 1
        #: Which deadline passed, for a timeout: ``connect``, ``first_token``, ``idle`` or ``total``.
        self.timeout = timeout


async def error_from_response(status: int, reason: str, headers: Mapping[str, str],
                              read: Callable[[int], Awaitable[bytes]], *, redact: Redactor,
                              deadline: float) -> UpstreamError:
    """The UpstreamError for a non-2xx answer; its body (``read(limit)``) is read until ``deadline``."""
    request_id = request_id_of(headers, redact)
    retry_after = retry_after_of(headers)
    retry_after_ms = retry_after_ms_of(headers)
    if status in (401, 403):
        # The relay's own credentials failed.  Never pass the upstream's text on: OpenAI's 401
        # message quotes part of the key.
        return UpstreamError(
            "upstream_error",
            f"the upstream rejected the relay's credentials (HTTP {status}); "
            "the relay's API key or upstream configuration needs fixing",
            status=status, retriable=False, request_id=request_id, failover=True,
        )
    retriable = status == 429 or status >= 500
    try:
        async with asyncio.timeout_at(deadline):
            # One byte past the bound tells a body that fits from one that was cut.
            raw = await read(ERROR_BODY_LIMIT + 1)
    except TimeoutError:
        return UpstreamError(
            "upstream_timeout", f"the upstream answered HTTP {status} and then sent nothing more within the timeout",
            status=status, retriable=retriable, retry_after=retry_after, retry_after_ms=retry_after_ms,
            request_id=request_id, failover=fails_over(status),
        )
    except ConnectionError:
        raw = b""
    err = None
    if len(raw) <= ERROR_BODY_LIMIT:
        err = error_from_json(raw, status=status, request_id=request_id, redact=redact)
    if err is None:
        reason = redact.text(reason or "error", 100)
        err = UpstreamError("upstream_error", f"the upstream answered HTTP {status} {reason}",
                            status=status, request_id=request_id)
    err.retriable, err.retry_after, err.retry_after_ms = retriable, retry_after, retry_after_ms
    err.failover = fails_over(status)
    return err


def redact_object(obj: Any, redact: Redactor) -> Any:
    """``obj`` with every key of the relay's (or a piece of one) blanked in every string, keys included."""
    if not redact.hides(dumps(obj)):
        return obj
    return map_strings(obj, redact, keys=True)


def map_strings(value: Any, fn: Any, *, keys: bool = False) -> Any:
    """A copy of JSON ``value`` with ``fn`` applied to every string in it (and to the keys of its
    objects, with ``keys``); iterative, so deep JSON is fine."""
    if isinstance(value, str):
        return fn(value)
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    todo = [(value, root)]
    while todo:
        src, dst = todo.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, item in items:
            if isinstance(item, (dict, list)):
                child: Any = {} if isinstance(item, dict) else []
                todo.append((item, child))
                item = child
            elif isinstance(item, str):
                item = fn(item)
            if isinstance(dst, dict):
                dst[fn(key) if keys and isinstance(key, str) else key] = item
            else:
                dst.append(item)
    return root


def error_from_json(raw: bytes, *, status: int | None, request_id: str | None,
                    redact: Redactor) -> UpstreamError | None:
    """An error body that is JSON (an object or a list) → UpstreamError carrying it; else None."""
    text = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, (dict, list)):
        return None
    return error_from_body(obj, status=status, request_id=request_id, midstream=False, redact=redact,
                           raw=text)


def _decodes_to(text: str, obj: Any) -> bool:
    try:
        return bool(json.loads(text) == obj)
    except ValueError:
        return False


def error_object(obj: Any) -> Any:
    """The error inside a body: ``{"error": {...}}`` (OpenAI), ``{"error": "text"}`` (TGI, some servers),
    ``[{"error": {...}}]`` (Gemini), or the body itself (``{"object": "error", ...}``, ``{"detail": ...}``)."""
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        obj = obj[0]
    if isinstance(obj, dict) and obj.get("error"):
        return obj["error"]
    return obj


def _message_of(err: Any) -> str:
    if isinstance(err, dict):
        for key in ("message", "detail", "error"):
            if isinstance(err.get(key), str) and err[key]:
                return str(err[key])
        return "no message"
    if isinstance(err, str) and err:
        return err
    return "no message"


def _bounded(value: Any) -> Any:
    """``value`` with every string cut to DETAIL_STRING characters."""
    return map_strings(value, lambda text: text[:DETAIL_STRING])


def upstream_fields(err: Any) -> dict[str, Any] | None:
    """What /chat's error event shows of the upstream's error: type, code, param, and the other
    fields as ``detail`` (OpenRouter's ``metadata.raw``, Groq's ``failed_generation``...), bounded."""
    if not isinstance(err, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("type", "code", "param"):
        value = err.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            out[key] = value[:200] if isinstance(value, str) else value
    detail: dict[str, Any] = {}
    size = len(dumps(out))
    for key, value in err.items():
        if key in NAMED or not isinstance(key, str):
            continue
        piece = _bounded(value)
        cost = len(dumps(piece)) + len(key) + 4
        if size + cost > DETAIL_LIMIT:
            out["truncated"] = True
            continue
        detail[key[:100]] = piece
        size += cost
    if detail:
        out["detail"] = detail
    return out or None


def error_from_body(obj: dict[str, Any] | list[Any], *, status: int | None, request_id: str | None,
                    midstream: bool, redact: Redactor, raw: str | None = None) -> UpstreamError:
    """An upstream error body or event → UpstreamError; ``raw`` is its JSON text as sent.

    The upstream's text goes on to clients of /chat and /v1 alike, so the relay's key is blanked
    here, once, for both (belt and braces: no known upstream quotes it outside a 401/403).
    """
    # The decoded object is what a client reads, so it decides: a key the text spells with JSON
    # escapes (``\u0073k-...``) is in the object even where it is not in the text.
    redacted = redact_object(obj, redact)
    if raw is None:
        raw = dumps(redacted)
    elif redacted is not obj or redact.hides(raw):
        blanked = redact(raw)
        raw = blanked if _decodes_to(blanked, redacted) else dumps(redacted)
    obj = redacted
    err = error_object(obj)
    code = err.get("code") if isinstance(err, dict) else None
    if status is None and isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        status = code
    message = redact.text(_message_of(err))
    where = "mid-answer" if midstream else f"HTTP {status}"
    return UpstreamError(
        "upstream_error", f"the upstream reported an error ({where}): {message}",
        status=status, retriable=midstream or (status is not None and (status == 429 or status >= 500)),
        request_id=request_id, raw=raw, upstream=upstream_fields(err), failover=fails_over(status),
    )
