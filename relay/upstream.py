"""The model API client: one streamed chat completion at a time over a shared ClientSession.

It builds the request (URL, key header, extra headers and query from configuration only:
nothing a client sends can change where the relay connects), maps HTTP failures to one
``UpstreamError``, decodes the event stream incrementally and enforces the timeouts.

Decisions (DESIGN.md): read with ``readany()`` and decode incrementally, because
``readline()`` splits on LF only and caps line length; EOF after a ``finish_reason``
counts as finished (some servers omit ``[DONE]``), EOF before one is ``upstream_ended``;
the response is closed, never drained, because closing the connection is the only way
to stop the billing.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from relay.config import Config
from relay.sse import EventTooLarge, SSEDecoder

#: How much of an error body is read: enough for any JSON error, bounded against a hostile upstream.
ERROR_BODY_LIMIT: Final = 64 * 1024
_REQUEST_ID_HEADERS: Final = ("x-request-id", "request-id", "apim-request-id", "x-ms-request-id")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


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


@dataclass(frozen=True, slots=True)
class Chunk:
    """One upstream event: the data exactly as sent, and its parsed JSON."""

    data: str
    obj: dict[str, Any]


class UpstreamResponse:
    """One streamed answer.  ``await read()`` returns the next batch of chunks, ``[]`` at the end."""

    def __init__(self, resp: aiohttp.ClientResponse, config: Config, started: float) -> None:
        self._resp = resp
        self._decoder = SSEDecoder(max_event_size=config.max_upstream_event)
        self._idle = config.idle_timeout
        self._first_token_timeout = config.first_token_timeout
        self._first_deadline = started + config.first_token_timeout
        self._total_timeout = config.total_timeout
        self._total_deadline = started + config.total_timeout
        self._got_chunk = False
        self._ended = False
        self.status = resp.status
        self.headers = resp.headers
        self.request_id = _request_id(resp.headers)
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    async def read(self) -> list[Chunk]:
        loop = asyncio.get_running_loop()
        while not self._ended:
            if self._got_chunk:
                deadline = min(loop.time() + self._idle, self._total_deadline)
            else:
                deadline = min(self._first_deadline, self._total_deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._resp.content.readany()
            except TimeoutError:
                raise self._timeout_error(loop.time()) from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as exc:
                raise UpstreamError(
                    "upstream_ended",
                    "the upstream connection broke before the answer was finished",
                    retriable=True, request_id=self.request_id,
                ) from exc
            if not data:
                return self._at_eof()
            try:
                events = self._decoder.feed(data)
            except EventTooLarge as exc:
                raise UpstreamError("upstream_error", f"the upstream sent an oversized event: {exc}",
                                    retriable=False, request_id=self.request_id) from None
            chunks = self._chunks(events)
            if chunks:
                return chunks
        return []

    def _chunks(self, events: list[Any]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for event in events:
            data: str = event.data
            if data == "[DONE]":
                self._ended = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                raise UpstreamError("upstream_error", "the upstream sent an event whose data is not JSON",
                                    retriable=True, request_id=self.request_id) from None
            if not isinstance(obj, dict):
                raise UpstreamError("upstream_error", "the upstream sent an event that is not a JSON object",
                                    retriable=True, request_id=self.request_id)
            if "error" in obj and obj["error"]:
                raise _error_from_body(obj, status=None, request_id=self.request_id, midstream=True)
            for choice in obj.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
            if obj.get("usage"):
                self.usage = obj["usage"]
            self._got_chunk = True
            chunks.append(Chunk(data, obj))
        return chunks

    def _at_eof(self) -> list[Chunk]:
        self._ended = True
        if self.finish_reason is None:
            raise UpstreamError("upstream_ended", "the upstream ended the stream before the answer was finished",
                                retriable=True, request_id=self.request_id)
        return []

    def _timeout_error(self, now: float) -> UpstreamError:
        if now >= self._total_deadline:
            msg = f"the answer did not finish within the total timeout ({self._total_timeout:g} s)"
        elif not self._got_chunk:
            msg = f"the upstream sent no answer within the first-token timeout ({self._first_token_timeout:g} s)"
        else:
            msg = f"the upstream went silent for longer than the idle timeout ({self._idle:g} s)"
        return UpstreamError("upstream_timeout", msg, retriable=True, request_id=self.request_id)

    def close(self) -> None:
        """Close the connection (not release: draining would let the upstream keep generating)."""
        self._resp.close()


class UpstreamClient:
    """Builds requests from configuration and opens streamed answers."""

    def __init__(self, session: aiohttp.ClientSession, config: Config, base_url: str, api_key: str | None) -> None:
        self._session = session
        self._config = config
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._params = list(config.upstream_query)
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        headers.update(dict(config.upstream_headers))
        if api_key:
            if config.api_key_header.lower() == "authorization":
                headers["Authorization"] = f"Bearer {api_key}"
            else:
                headers[config.api_key_header] = api_key
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout
        )

    async def open(self, body: dict[str, Any]) -> UpstreamResponse:
        """POST the request; raise UpstreamError unless the upstream answers 2xx with an event stream."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + min(self._config.first_token_timeout, self._config.total_timeout)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._session.post(
                    self.url, data=payload, headers=self._headers, params=self._params, timeout=self._timeout
                )
        except TimeoutError:
            raise UpstreamError(
                "upstream_timeout",
                f"the upstream sent no answer within the first-token timeout ({self._config.first_token_timeout:g} s)",
                retriable=True,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise UpstreamError("upstream_error", f"could not connect to the upstream ({reason})",
                                status=None, retriable=True) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError("upstream_error", f"the upstream request failed ({type(exc).__name__})",
                                status=None, retriable=True) from None
        if resp.status >= 300:
            try:
                raise await _error_from_response(resp)
            finally:
                resp.close()
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            resp.close()
            raise UpstreamError("upstream_error",
                                f"the upstream answered {resp.status} with {ctype or 'no content type'}, "
                                "not an event stream", status=resp.status, retriable=False,
                                request_id=_request_id(resp.headers))
        return UpstreamResponse(resp, self._config, started)

    async def probe(self, timeout: float) -> int:
        """``GET {base}/models`` with the key; the status, for the readiness answer (the body is not read)."""
        headers = {k: v for k, v in self._headers.items() if k not in ("Accept", "Content-Type")}
        async with self._session.get(self.base_url + "/models", headers=headers, params=self._params,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status


def _request_id(headers: Any) -> str | None:
    for name in _REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            return str(value)[:200]
    return None


async def _error_from_response(resp: aiohttp.ClientResponse) -> UpstreamError:
    request_id = _request_id(resp.headers)
    retry_after = resp.headers.get("retry-after")
    retry_after_ms = resp.headers.get("retry-after-ms")
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
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
        raw = b""
    retriable = status == 429 or status >= 500
    obj: Any = None
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
    if isinstance(obj, dict) and obj.get("error"):
        err = _error_from_body(obj, status=status, request_id=request_id, midstream=False)
        err.retriable, err.retry_after, err.retry_after_ms = retriable, retry_after, retry_after_ms
        return err
    reason = resp.reason or "error"
    return UpstreamError(
        "upstream_error", f"the upstream answered HTTP {status} {reason}",
        status=status, retriable=retriable, retry_after=retry_after, retry_after_ms=retry_after_ms,
        request_id=request_id,
    )


def _error_from_body(obj: dict[str, Any], *, status: int | None, request_id: str | None,
                     midstream: bool) -> UpstreamError:
    """``{"error": {...}}`` (OpenAI), ``{"error": "text"}`` (some servers) → UpstreamError."""
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
    message = _CONTROL.sub(" ", message)[:500]
    body["error"]["message"] = message
    where = "mid-answer" if midstream else f"HTTP {status}"
    return UpstreamError(
        "upstream_error", f"the upstream reported an error ({where}): {message}",
        status=status, retriable=midstream or (status is not None and (status == 429 or status >= 500)),
        request_id=request_id, body=body,
    )
