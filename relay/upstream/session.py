"""The one aiohttp ``ClientSession`` every upstream request goes through, and how each upstream is reached.

aiohttp's client, not a hand-written one (docs/architecture.md, "Reading upstream"): a relay sits
in front of model APIs reached over TLS across a network, and what that needs is aiohttp's own:
a pool that reuses the connection of an answer that ended cleanly (no TCP and TLS handshake per
answer), a DNS cache, outgoing proxies, TLS, every body framing, and decompression in bounded,
flow-controlled pieces.  What the relay adds is policy: the bounds below, which connection is
closed rather than reused (relay/upstream/response.py), what is redacted.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from relay.config import Config
from relay.upstream.config import UpstreamSpec

#: Bytes an answer buffers before aiohttp stops reading its socket (its own default is 64 KiB):
#: a paused answer (every reader full) costs this much and no more parsing or decompression;
#: readers that keep up never fill it.
READ_BUFFER: Final = 16 * 1024
#: Seconds a resolved upstream address is reused (aiohttp's default: 10).
DNS_TTL: Final = 10
#: Seconds an idle pooled connection is kept for the next answer (aiohttp's default: 15).
KEEPALIVE: Final = 15.0


def make_session(config: Config) -> aiohttp.ClientSession:
    """The shared session: at most ``--pool-limit`` connections, every upstream together."""
    connector = aiohttp.TCPConnector(limit=config.pool_limit, limit_per_host=0, ttl_dns_cache=DNS_TTL,
                                     keepalive_timeout=KEEPALIVE)
    # No cookie jar: what one upstream answer sets must not ride along with another client's request.
    return aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFFER, auto_decompress=True,
                                 trust_env=config.upstream_trust_env, cookie_jar=aiohttp.DummyCookieJar())


@dataclass(frozen=True, slots=True)
class Reach:
    """How one upstream is reached: its TLS context (https) and its proxy, if any."""

    ssl: ssl.SSLContext | bool
    proxy: str | None
    #: ``Proxy-Authorization`` for the proxy's CONNECT (never logged: aiohttp's errors do not carry it).
    proxy_headers: dict[str, str] | None


def reach_of(spec: UpstreamSpec, config: Config) -> Reach:
    """An entry's own ``proxy`` and ``ca_file`` win over the relay-wide ``--upstream-proxy`` and
    ``--upstream-ca-file``; without either, the environment's proxy (``--upstream-trust-env``)."""
    proxy, auth = (spec.proxy, spec.proxy_auth) if spec.proxy is not None else (
        config.upstream_proxy, config.upstream_proxy_auth)
    context: ssl.SSLContext | bool = True
    if spec.url.startswith("https:"):
        context = tls_context(spec.ca_file or config.upstream_ca_file, spec.client_cert, spec.client_key)
    headers = {"Proxy-Authorization": aiohttp.encode_basic_auth(*auth)} if auth is not None else None
    return Reach(context, proxy, headers)


def tls_context(ca_file: Path | None, client_cert: Path | None, client_key: Path | None) -> ssl.SSLContext:
    """The system's trust store (``SSL_CERT_FILE`` points it elsewhere), plus a private CA and a
    client certificate when given.  Made per upstream when the pool is built, so the environment
    of that moment counts (aiohttp's own default context is made once, at import)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key is not None else None)
    return context
