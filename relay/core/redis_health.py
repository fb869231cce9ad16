"""Whether Redis counts as there: the bound on every wait for it on a request's path, and what
the store does while it is away.

Every step a request waits for (``ask``) is bounded by ``--redis-timeout``.  Past it, Redis counts
as away until a round trip succeeds again: steps fail at once with ``StoreUnavailable`` (one
request per bound still tries), the loss and the return are each logged once per outage, and
on its return the store rewrites the copies that fell behind (``repair_soon``).  The errors that
mean "away" are named here once, for every module of the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from relay.config import Config
from relay.core.store import StoreUnavailable

if TYPE_CHECKING:
    from relay.metrics import Metrics

T = TypeVar("T")

log = logging.getLogger("relay.redis")

#: Errors that mean "Redis is not there now" (connection refused, reset, timed out, loading).
try:
    from redis import exceptions as _rexc

    # (and, on Redis Cluster, a failover under way: no master for a slot yet)
    UNAVAILABLE: tuple[type[BaseException], ...] = (_rexc.ConnectionError, _rexc.TimeoutError,
                                                     _rexc.BusyLoadingError, _rexc.ClusterDownError,
                                                     _rexc.TryAgainError, _rexc.SlotNotCoveredError, OSError)
    RedisError: type[Exception] = _rexc.RedisError
except ImportError:  # the optional extra is missing: open_store says so before anything runs
    UNAVAILABLE = (OSError,)
    RedisError = OSError
#: Away, or too slow to count as there (a bound passed).
AWAY: tuple[type[BaseException], ...] = (*UNAVAILABLE, TimeoutError)
AWAY_OR_FAILED: tuple[type[BaseException], ...] = (*AWAY, RedisError)


def where(url: str) -> str:
    """Where a Redis is, for log lines and errors: scheme, host and port, never a credential."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def reason(exc: BaseException) -> str:
    """An error's text without anything that could be a credential."""
    text = str(exc) or type(exc).__name__
    return text.split("\n", 1)[0][:200]


class RedisHealth:
    """The Redis store's reachability (relay/core/redis_store.py builds on it)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._where = where(config.redis_url or "")
        #: Round-trip times and errors, when metrics are on (relay/metrics.py).
        self.metrics: Metrics | None = None
        #: The bound on any wait for Redis on a request's path (--redis-timeout).
        self.bound = config.redis_timeout
        self.away = AWAY
        self.away_or_failed = AWAY_OR_FAILED
        self.unavailable = UNAVAILABLE
        self.failed = RedisError
        #: What a step that fails soft catches: the bound passed, Redis away, or Redis refusing.
        self.soft: tuple[type[BaseException], ...] = (StoreUnavailable, RedisError)
        self.available = True
        #: While Redis is away, requests fail at once until this loop time (then one tries).
        self._probe_at = 0.0
        #: Until then a stream not found may only be not yet rewritten (Redis came back).
        self.unsure_until = 0.0
        self._lost_logged = -1e9  # loop time the last outage was logged
        self._back_logged = -1e9

    def repair_soon(self) -> None:
        """Rewrite the copies that fell behind while Redis was away."""
        raise NotImplementedError

    async def ask(self, step: Awaitable[T]) -> T:
        """One step on a request's path, bounded; StoreUnavailable when Redis is away or too slow."""
        if not self.available and asyncio.get_running_loop().time() < self._probe_at:
            # Away: fail at once, but let one request in each bound try (the loops retry too).
            if asyncio.iscoroutine(step):
                step.close()
            raise StoreUnavailable(f"the shared store (Redis) cannot be reached now ({self._where})")
        try:
            async with asyncio.timeout(self.bound):
                result = await step
        except AWAY as exc:
            self.lost_redis(exc)
            raise StoreUnavailable(f"the shared store (Redis) cannot be reached: {self.reason(exc)}") from None
        self.back()
        return result

    def reason(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.bound:g} s (--redis-timeout)"
        return reason(exc)

    def lost_redis(self, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        self._probe_at = now + self.bound
        if self.available:
            self.available = False
            # Once per outage, and at most once a minute when it flaps (a cluster failover: some
            # nodes answer while one does not).
            if now - self._lost_logged < 60:
                log.debug("Redis at %s is unreachable again: %s", self._where, self.reason(exc))
                return
            self._lost_logged = now
            log.error("Redis at %s is unreachable (%s): streams go on for their local readers, resumes "
                      "elsewhere get 503 and per-client limits are counted per process until it is back",
                      self._where, self.reason(exc))

    def back(self) -> None:
        if not self.available:
            self.available = True
            now = asyncio.get_running_loop().time()
            # Until every producer has had a refresher round to write its streams again, a
            # stream not found may only be not yet rewritten.
            self.unsure_until = now + self.config.owner_ttl
            self.repair_soon()
            if self._back_logged >= self._lost_logged:
                return  # the back of an outage whose loss was not logged either (flapping)
            self._back_logged = now
            log.warning("Redis at %s is reachable again: limits are shared again and copies that fell "
                        "behind are rewritten", self._where)

    def count(self, op: str, began: float | None) -> None:
        """One round trip for the metrics: its time since ``began``, or (None) an error."""
        if self.metrics is None:
            return
        if began is None:
            self.metrics.redis_errors.labels(op).inc()
        else:
            self.metrics.redis_round_trip.labels(op).observe(time.perf_counter() - began)

