"""The checks every request passes before a handler runs, in this order (docs/security.md):

0. A ``Content-Length`` over ``--max-body`` is refused (413) before the body is read, and a
   request with ``Expect: 100-continue`` gets that 413 instead of ``100 Continue``
   (``expect_handler``).  A request without ``Host`` (HTTP/1.0) is refused (400) unless
   ``--allow-missing-host``: aiohttp would fill in the machine's own name, which passes 1.
1. ``Host`` must name this relay (``--allow-host``; the bind address and localhost names by
   default): a DNS-rebinding page reaches a loopback relay under its own name.  421.
2. ``Origin``, when sent, must be the relay's own page or an ``--allow-origin``: any web page
   can make its visitors' browsers send requests here.  403.  CORS preflights are answered
   here, for allowed origins only (they never carry a token).
3. A cross-site request without ``Origin`` (``<img src=/chat?prompt=...>``, a link; browsers
   say ``Sec-Fetch-Site: cross-site``) never reaches the API.  403.
4. With ``--tokens-file``: ``Authorization: Bearer <token>`` on every API route (401), except
   a ``/chat/{id}`` events URL carrying a signed capability, which its handler checks.
5. Requests per minute per client (``--rate-limit``).  429 with ``Retry-After``.

``/healthz`` and ``/readyz`` skip all of it: probes come from anywhere, under any name, and the
answers reveal nothing secret.  Every response gets ``X-Content-Type-Options: nosniff``.
Errors are ``{"error": {"message", "type", "param", "code"}}``, which is OpenAI's shape, so on
``/v1`` the SDKs raise ``AuthenticationError``, ``PermissionDeniedError``, ``RateLimitError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http import HttpVersion11

from relay.config import Config
from relay.core.ids import is_ascii_digits
from relay.http.access import Access, client_of, from_trusted_proxy
from relay.http.appkeys import ACCESS, CONFIG, GUARD, LIMITS, METRICS
from relay.http.errors import REFUSAL, error_response
from relay.http.ratelimit import ClientLimits, retry_after

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
LOCAL_NAMES: Final = ("localhost", "127.0.0.1", "[::1]", "::1")
CORS_HEADERS: Final = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "600",
}


def is_api(path: str) -> bool:
    return path == "/chat" or path.startswith(("/chat/", "/v1/"))


class Guard:
    """The settings the middleware needs, parsed once."""

    def __init__(self, config: Config) -> None:
        hosts = {_host_key(h) for h in (*LOCAL_NAMES, config.host, *config.allow_hosts)}
        self.any_host = "*" in config.allow_hosts
        self.missing_host_allowed = config.allow_missing_host
        self.hosts = frozenset(hosts)
        self.origins = frozenset(o.lower().rstrip("/") for o in config.allow_origins)

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        host = host.strip().lower()
        # An entry without a port matches the name on any port; one with a port, only that port.
        return host in self.hosts or _host_key(host, strip_port=True) in self.hosts

    def origin_allowed(self, request: web.Request, origin: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins:
            return True
        # The relay's own page: the same host (and port) as the request names.  The scheme is
        # checked when a trusted proxy says it (behind TLS termination the relay sees http).
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc != request.host.lower():
            return False
        trusted = from_trusted_proxy(request, request.app[ACCESS].trusted)
        proto = request.headers.get("X-Forwarded-Proto") if trusted else None
        return proto is None or proto.split(",")[0].strip().lower() == parts.scheme




def _host_key(host: str, *, strip_port: bool = False) -> str:
    host = host.strip().lower()
    if not strip_port:
        return host
    if host.startswith("["):  # [v6]:port
        return host.split("]", 1)[0] + "]"
    name, sep, port = host.rpartition(":")
    return name if sep and is_ascii_digits(port) and ":" not in name else host


def _too_large(request: web.Request) -> web.Response | None:
    limit = request.app[CONFIG].max_body
    length = request.content_length
    if length is None or length <= limit:
        return None
    resp = error_response(413, f"the request body ({length} bytes) is larger than the limit of {limit} bytes "
                          "(--max-body)", code="request_too_large", refusal="size")
    resp.force_close()  # the body that may follow is never read
    return resp


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: a body over the limit is refused before the client sends it."""
    refused = _too_large(request)
    if refused is not None:
        return refused
    if request.version == HttpVersion11:
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(417, "the only Expect this relay knows is 100-continue",
                                  code="expectation_failed", refusal="invalid")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not begun
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    refused = _too_large(request)
    if refused is not None:
        return refused
    if request.path in OPEN_PATHS:
        return await handler(request)
    app = request.app
    checks = app[GUARD]
    if "Host" not in request.headers and not checks.missing_host_allowed:
        return error_response(400, "the request has no Host header; this relay answers only requests that name it "
                              "(--allow-missing-host to accept them)", code="host_missing", refusal="host")
    if not checks.host_allowed(request.host):
        return error_response(421, "this relay does not answer to that Host name; if it is yours, add it with "
                     "--allow-host (this check stops DNS-rebinding pages)", code="host_not_allowed", refusal="host")
    origin = request.headers.get("Origin")
    if origin is not None:
        if not checks.origin_allowed(request, origin):
            return error_response(403, "requests from this web page's origin are not allowed; add it with --allow-origin "
                         "if it should be", code="origin_not_allowed", type_="permission_error", refusal="origin")
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return web.Response(status=204, headers={**CORS_HEADERS, "Access-Control-Allow-Origin": origin,
                                                     "Vary": "Origin"})
    elif request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site" and is_api(request.path):
        return error_response(403, "cross-site requests without an Origin (links, images, forms of other sites) may not "
                     "use this relay", code="cross_site", type_="permission_error", refusal="origin")
    if is_api(request.path):
        refused = _authenticate(request)
        if refused is not None:
            return refused
        limited = await _rate_limit(request)
        if limited is not None:
            return limited
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(405, f"the method {request.method} is not allowed here; allowed: {allowed}",
                     code="method_not_allowed", headers={"Allow": allowed}, refusal="method")


def _authenticate(request: web.Request) -> web.Response | None:
    if not request.app[ACCESS].enabled:
        return None
    client = client_of(request)
    if client.owner is not None:
        return None
    if client.presented:
        return _unauthorized("the access token is not valid (unknown, mistyped or revoked)")
    if request.path.startswith("/chat/") and "sig" in request.query:
        return None  # an events URL: its capability names the stream's owner, so the handler checks it
    message = "this relay needs an access token: send the header 'Authorization: Bearer <token>'"
    if request.path == "/chat" and request.method == "GET":
        message += ("; EventSource cannot send headers, so POST /chat with 'Accept: application/json' "
                    "and open the events URL it returns")
    return _unauthorized(message)


def _unauthorized(message: str) -> web.Response:
    return error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="relay"'},
                          refusal="auth")


async def _rate_limit(request: web.Request) -> web.Response | None:
    if request.method == "DELETE":
        return None  # stopping a generation saves money; never refuse it
    limits = request.app[LIMITS]
    limiter = limits.rate
    wait = await limits.take(client_of(request).identity)
    if not wait:
        return None
    after = retry_after(wait)
    return error_response(429, f"too many requests: this relay allows {limiter.per_minute} per minute per client "
                 f"(--rate-limit); retry in {after} s", code="rate_limit_exceeded", type_="requests",
                 headers={"Retry-After": after}, refusal="rate_limit")


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response gets, whichever handler (or aiohttp itself) made it."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    metrics = request.app.get(METRICS)
    if metrics is not None:
        reason = response.get(REFUSAL) or ("auth" if response.status == 401 else None)
        if reason is not None:
            metrics.refused.labels(reason).inc()
    origin = request.headers.get("Origin")
    if (origin is not None and request.path not in OPEN_PATHS and "Access-Control-Allow-Origin" not in response.headers
            and request.app[GUARD].origin_allowed(request, origin)):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Location"
        response.headers.add("Vary", "Origin")


def install(app: web.Application) -> None:
    """Add the checks to an app whose CONFIG is set (relay/http/app.py)."""
    config: Config = app[CONFIG]
    app[GUARD] = Guard(config)
    app[ACCESS] = Access(config)
    app[LIMITS] = ClientLimits(config)
    app.middlewares.append(guard)
    app.on_response_prepare.append(on_response_prepare)
