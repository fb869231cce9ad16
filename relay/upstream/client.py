"""The model API client: one upstream's requests, over the shared aiohttp session (relay/upstream/session.py).

It builds the request (URL, key header, extra headers and query from configuration only:
nothing a client sends can change where the relay connects), maps every HTTP failure to one
``UpstreamError`` whose text names no address and quotes nothing of the key, and opens streamed
answers (relay/upstream/response.py) and non-streamed ones.  Redirects are never followed: one
would carry the key (a custom header such as Azure's ``api-key`` survives a redirect to another
host) wherever the upstream points.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from relay import __version__
from relay.bodies import read_bounded
from relay.config import Config
from relay.jsoncodec import dumps
from relay.upstream.chunks import CHAT, RESPONSES, Chunk
from relay.upstream.errors import UpstreamError, error_from_body, error_from_response
from relay.upstream.metadata import Redactor, request_id_of
from relay.upstream.response import Target, UpstreamResponse
from relay.upstream.session import Reach

__all__ = ["Chunk", "Completion", "Target", "UpstreamClient", "UpstreamResponse"]

log = logging.getLogger("relay.upstream")

#: The content codings the relay asks for and reads (aiohttp decodes them in bounded pieces).
CODINGS: Final = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


@dataclass(frozen=True, slots=True)
class Completion:
    """A non-streamed answer: the body exactly as sent, its parsed JSON and the upstream's request id."""

    raw: bytes
    obj: dict[str, Any]
    request_id: str | None
    status: int = 200


class UpstreamClient:
    """One upstream: builds its requests from configuration and opens answers."""

    def __init__(self, session: aiohttp.ClientSession, config: Config, target: Target, redact: Redactor,
                 reach: Reach | None = None) -> None:
        self._session = session
        self._config = config
        self.target = target
        self.name = target.name
        self.base_url = target.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._urls = {CHAT: self.url, RESPONSES: self.base_url + "/responses"}
        self._params = list(target.query)
        self._reach = reach or Reach(True, None, None)
        # The codings the relay reads, named (with none, any coding would be acceptable), and who asks.
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json",
                   "Accept-Encoding": "gzip, deflate", "User-Agent": f"relay/{__version__}"}
        configured = {name.lower() for name, _ in target.headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in configured}  # theirs win, in any case
        headers.update(dict(target.headers))
        if target.api_key:
            if target.api_key_header.lower() == "authorization":
                headers["Authorization"] = f"Bearer {target.api_key}"
            else:
                headers[target.api_key_header] = target.api_key
        self._headers = headers
        self._redact = redact
        self._timeout = aiohttp.ClientTimeout(total=None, connect=target.connect_timeout,
                                              sock_connect=target.connect_timeout)

    async def open(self, body: dict[str, Any], *, total_deadline: float | None = None,
                   api: str = CHAT) -> UpstreamResponse:
        """POST the request; raise UpstreamError unless the upstream answers 2xx with an event stream.

        ``total_deadline`` (loop time) is the request's, across all its attempts; the first-token
        timeout counts from this attempt.
        """
        started = asyncio.get_running_loop().time()
        if total_deadline is None:
            total_deadline = started + self._config.total_timeout
        first = started + self.target.first_token_timeout
        if first <= total_deadline:
            limit, deadline, phase = self.target.first_token_timeout, first, "first_token"
            too_late = f"the upstream sent no answer within the first-token timeout ({limit:g} s)"
        else:
            deadline, phase = total_deadline, "total"
            too_late = f"the answer did not finish within the total timeout ({self._config.total_timeout:g} s)"
        resp = await self._post(body, "text/event-stream", deadline, too_late, phase, failover=first <= total_deadline,
                                api=api)
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            resp.close()
            raise UpstreamError("upstream_error",
                                f"the upstream answered {resp.status} with "
                                f"{self._redact.text(ctype, 100) if ctype else 'no content type'}, not an event stream",
                                status=resp.status, retriable=False,
                                request_id=request_id_of(resp.headers, self._redact), failover=True)
        return UpstreamResponse(resp, self._config, self.target, started, total_deadline, self._redact, api)

    async def complete(self, body: dict[str, Any], *, total_deadline: float | None = None,
                       api: str = CHAT) -> Completion:
        """A non-streamed answer: the upstream's JSON body as sent (bounded), within the total timeout."""
        deadline = total_deadline or asyncio.get_running_loop().time() + self._config.total_timeout
        too_late = f"the answer did not finish within the total timeout ({self._config.total_timeout:g} s)"
        resp = await self._post(body, "application/json", deadline, too_late, "total", failover=False, api=api)
        request_id = request_id_of(resp.headers, self._redact)
        try:
            async with asyncio.timeout_at(deadline):
                raw = await read_bounded(resp.content, self._config.max_upstream_event + 1)
        except TimeoutError:
            raise UpstreamError("upstream_timeout", too_late, retriable=True, request_id=request_id,
                                timeout="total") from None
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise UpstreamError("upstream_ended", "the upstream connection broke before the answer was finished",
                                retriable=True, request_id=request_id, failover=True) from exc
        finally:
            resp.close()  # after a whole body aiohttp has already given the connection back
        if len(raw) > self._config.max_upstream_event:
            raise UpstreamError("upstream_error", "the upstream's answer is larger than --max-upstream-event",
                                request_id=request_id)
        raw = self._redact.body(raw)
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamError("upstream_error", "the upstream's answer is not a JSON object",
                                retriable=True, request_id=request_id, failover=True)
        if obj.get("error"):
            raise error_from_body(obj, status=None, request_id=request_id, midstream=False,
                                  redact=self._redact, raw=raw.decode("utf-8", "replace"))
        return Completion(raw, obj, request_id, resp.status)

    async def _post(self, body: dict[str, Any], accept: str, deadline: float, too_late: str, phase: str, *,
                    failover: bool, api: str = CHAT) -> aiohttp.ClientResponse:
        """POST ``body``; the response once its headers are in, or UpstreamError for any failure or non-2xx."""
        payload = dumps(body).encode()
        reach = self._reach
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._session.post(
                    self._urls[api], data=payload, headers={**self._headers, "Accept": accept}, params=self._params,
                    timeout=self._timeout, allow_redirects=False, ssl=reach.ssl, proxy=reach.proxy,
                    proxy_headers=reach.proxy_headers)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError("upstream_timeout", f"could not connect to the upstream within the connect timeout "
                                f"({self.target.connect_timeout:g} s)", retriable=True, failover=True,
                                timeout="connect") from None
        except TimeoutError:
            raise UpstreamError("upstream_timeout", too_late, retriable=True, failover=failover,
                                timeout=phase) from None
        except aiohttp.ClientError as exc:
            reason = self._failure(exc)
            # Debug: the pool warns once when an upstream starts failing (relay/upstream/pool.py).
            log.debug("the request to the upstream %s failed: %s", self.name, reason)
            raise UpstreamError("upstream_error", reason, status=None, retriable=True, failover=True) from None
        except ConnectionError as exc:
            raise UpstreamError("upstream_error", f"the upstream request failed ({_os_reason(exc)})",
                                status=None, retriable=True, failover=True) from None
        status = resp.status
        if not 200 <= status < 300 or status in (204, 205):
            # The error body is read under a deadline too: an upstream that sends its status and
            # then nothing must not hold the stream past the timeouts.  Headers are the upstream's
            # first sign of life, so from here silence is bounded by the idle timeout.
            body_deadline = min(deadline, asyncio.get_running_loop().time() + self.target.idle_timeout)
            try:
                if status < 300:
                    # 1xx (an upgrade), 204, 205: no answer can follow, whatever the head claims.
                    raise UpstreamError("upstream_error", f"the upstream request failed (it answered {status}, "
                                        "which carries no answer)",
                                        status=status, request_id=request_id_of(resp.headers, self._redact),
                                        failover=True)
                raise await error_from_response(status, resp.reason or "", resp.headers,
                                                lambda n: read_bounded(resp.content, n),
                                                redact=self._redact, deadline=body_deadline)
            finally:
                resp.close()
        coding = resp.headers.get("Content-Encoding", "").strip().lower()
        if coding not in CODINGS:
            resp.close()
            raise UpstreamError("upstream_error", "the upstream sent a content coding the relay does not read "
                                f"({self._redact.text(coding, 40)}); it asks for gzip or deflate",
                                status=status, request_id=request_id_of(resp.headers, self._redact), failover=True)
        return resp

    def _failure(self, exc: aiohttp.ClientError) -> str:
        """What went wrong, for a client and the log: never an address, a header's value or the proxy's URL."""
        if isinstance(exc, aiohttp.ClientSSLError):
            inner = exc.__cause__ if exc.__cause__ is not None else getattr(exc, "os_error", None)
            reason = getattr(inner, "reason", None) or getattr(getattr(exc, "certificate_error", None), "reason", None)
            # The library's reason (CERTIFICATE_VERIFY_FAILED, ...) names no host or address.
            return f"could not connect to the upstream (TLS: {reason or 'handshake failed'})"
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return f"the upstream proxy refused the connection (HTTP {exc.status})"
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return f"could not connect to the upstream proxy ({_os_reason(exc.os_error)})"
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return "could not connect to the upstream (its host name did not resolve)"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"could not connect to the upstream ({_os_reason(exc.os_error)})"
        if isinstance(exc, aiohttp.ClientResponseError):
            # The parser's message may quote the head itself (and so a header that holds the key):
            # it is only classified, never passed on.  aiohttp re-raises its parser's errors as a
            # plain HttpProcessingError, so its words are all there is to tell them apart by
            # (tests/test_upstream_http.py pins both).
            said = str(exc.message)
            if said.startswith("Got more than"):
                return "the upstream request failed (its answer's headers are too large)"
            if said.startswith("Can not decode content-encoding"):
                return "the upstream sent a content coding the relay does not read; it asks for gzip or deflate"
            return "the upstream request failed (its answer's head is malformed)"
        return f"the upstream request failed ({type(exc).__name__})"

    async def probe(self, timeout: float) -> int:
        """``GET {base}/models`` with the key; the status, for the readiness answer (the body is not read)."""
        async with self._get_models(timeout) as resp:
            return int(resp.status)

    async def model_ids(self, timeout: float) -> list[str]:
        """The ids in the upstream's own ``GET {base}/models`` (for an upstream that serves ``"*"``)."""
        async with self._get_models(timeout) as resp:
            if resp.status != 200:
                return []
            raw = await read_bounded(resp.content, 4 * 1024 * 1024)
        try:
            data = json.loads(raw).get("data")
        except (ValueError, AttributeError):
            return []
        if not isinstance(data, list):
            return []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]

    async def forward(self, method: str, path: str, query: list[tuple[str, str]], limit: int) -> tuple[int, bytes]:
        """``method`` on one of the upstream's own routes (``path`` under its base URL) with the relay's
        key, for the stateful routes the relay passes on: its status and its body (at most ``limit``
        bytes, every whole key blanked).  UpstreamError when it cannot be reached or is too slow."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self.target.connect_timeout,
                                        sock_connect=self.target.connect_timeout, sock_read=self.target.idle_timeout)
        try:
            async with self._request(method, path, timeout, query) as resp:
                raw = await read_bounded(resp.content, limit + 1)
                status = resp.status
        except TimeoutError:
            raise UpstreamError("upstream_timeout", "the upstream did not answer within its timeouts",
                                retriable=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("upstream_error", self._failure(exc), retriable=True) from None
        if len(raw) > limit:
            raise UpstreamError("upstream_error", "the upstream's answer is larger than --max-upstream-event")
        return status, self._redact.body(raw)

    def _get_models(self, timeout: float) -> Any:
        return self._request("GET", "/models", aiohttp.ClientTimeout(total=timeout))

    def _request(self, method: str, path: str, timeout: aiohttp.ClientTimeout,
                 query: list[tuple[str, str]] | None = None) -> Any:
        """A bodiless request to ``path`` under the upstream's base URL, reached as its answers are,
        with the key (and the configured query first); used as ``async with``."""
        headers = {k: v for k, v in self._headers.items() if k not in ("Accept", "Content-Type")}
        reach = self._reach
        return self._session.request(method, self.base_url + path, headers=headers,
                                     params=[*self._params, *(query or ())], timeout=timeout, allow_redirects=False,
                                     ssl=reach.ssl, proxy=reach.proxy, proxy_headers=reach.proxy_headers)


def _os_reason(exc: BaseException | None) -> str:
    """From the errno, not strerror: asyncio's text names the upstream's address, which is the
    operator's business, not the client's."""
    errno = getattr(exc, "errno", None)
    return os.strerror(errno) if isinstance(errno, int) and errno else type(exc).__name__
