"""Connections per client and in total, counted before any request is parsed.

A request's identity (its token, ``X-Forwarded-For``) does not exist yet when a connection
opens, so the per-client bound here is by peer address; connections from a ``--trust-proxy``
address are exempt from it (behind nginx every client shares the proxy's address, and nginx
bounds its own clients: ``limit_conn``), while the total bound still counts them.  The total
stays below the open-file limit: every client connection is one descriptor and its upstream
connection another.

An over-limit connection gets a one-line HTTP answer (``429``, or ``503`` at the total) and is
closed at once; each client's refusals are logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp.web import RequestHandler

from relay.logthrottle import OncePerClient
from relay.jsoncodec import dumps

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger("relay.http")


def _answer(status: str, message: str, code: str) -> bytes:
    body = dumps({"error": {"message": message, "type": "rate_limit_error" if status.startswith("429")
                            else "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 1\r\nConnection: close\r\n\r\n").encode() + body


def auto_total(open_files_limit: int) -> int:
    """Client connections the open-file limit allows: each may hold an upstream connection too, and
    some descriptors are the process's own (listening sockets, logs, the event loop)."""
    return max(16, (open_files_limit - 64) // 2)


class ConnectionLimits:
    def __init__(self, *, per_client: int, total: int, exempt: Iterable[str] = (),
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self.per_client = per_client
        self.total = total
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self._by_addr: Counter[str] = Counter()
        self._addr_of: dict[RequestHandler, str] = {}
        self._lines = OncePerClient()
        self.refused = 0

    def made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """A new connection (relay/aiohttp_internals.py's hook): counted, or refused past a limit."""
        addr = peer_address(transport.get_extra_info("peername"))
        if len(self._addr_of) >= self.total:
            self._refuse(transport, addr, "503 Service Unavailable", "the relay is at its limit of "
                         f"{self.total} connections; try again shortly", "too_many_connections", "total")
        elif not self._is_exempt(addr) and self._by_addr[addr] >= self.per_client:
            self._refuse(transport, addr, "429 Too Many Requests", "this client has "
                         f"{self.per_client} connections open already (--max-connections-per-client)",
                         "too_many_connections", "per_client")
        else:
            self._addr_of[handler] = addr
            self._by_addr[addr] += 1

    def lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        addr = self._addr_of.pop(handler, None)
        if addr is not None:
            self._by_addr[addr] -= 1
            if self._by_addr[addr] <= 0:
                del self._by_addr[addr]

    @property
    def open(self) -> int:
        return len(self._addr_of)

    def _is_exempt(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._exempt)

    def _refuse(self, transport: asyncio.Transport, addr: str, status: str, message: str, code: str,
                limit: str) -> None:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.connections_refused.labels(limit).inc()
        transport.write(_answer(status, message, code))
        transport.close()
        folded = self._lines.due(addr)
        if folded is not None:
            log.info("refused a connection from %s: %s%s", addr, message,
                     f" ({folded} more since the last line)" if folded else "")


def peer_address(peer: Any) -> str:
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "unix" if peer is not None else "unknown"
