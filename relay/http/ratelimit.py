"""Per-client limits: requests per minute (a token bucket) and generations running at once.

A client is its access token, else its address (relay/http/access.py).  The bucket table is an LRU
bounded by ``max_clients``: the identity evicted first is the one idle longest, whose bucket
has most likely refilled, so evicting it forgets nothing.  The stream counter only holds
identities with a generation running, so it is bounded by the number of live streams.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final


from relay.config import Config
from relay.core.store import SharedLimits

MAX_CLIENTS: Final = 10_000


class TooManyStreams(Exception):
    """The client already runs its share of generations; the message is for the client."""


class RateLimiter:
    """``per_minute`` requests per identity, in bursts of up to ``per_minute``; 0 turns it off."""

    def __init__(self, per_minute: int, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0  # tokens per second
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # identity → (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str) -> float:
        """Spend one request: 0 when allowed, else the seconds until the next one is."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.pop(identity, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[identity] = (tokens, now)  # most recently used last
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


class StreamSlots:
    """At most ``per_client`` generations running at once per identity."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._running: dict[str, int] = {}

    def running(self, identity: str) -> int:
        return self._running.get(identity, 0)

    def acquire(self, identity: str, *, bound: bool = True) -> Callable[[], None]:
        """Take a slot, or raise TooManyStreams; call the returned function (once) to give it back.

        ``bound=False`` only counts (the shared store decided), so the local count is right
        should the store go away while the generation runs."""
        count = self._running.get(identity, 0)
        if bound and count >= self.per_client:
            raise TooManyStreams(_too_many(count))
        self._running[identity] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._running.get(identity, 1) - 1
            if left > 0:
                self._running[identity] = left
            else:
                self._running.pop(identity, None)
        return release


class ClientLimits:
    """Per-client limits: the request rate and the generations running at once.

    With a shared store they hold across every instance; while the store is away each process
    counts on its own (the store logs that once), and shared counting resumes when it is back.
    """

    def __init__(self, config: Config, shared: SharedLimits | None = None) -> None:
        self.rate = RateLimiter(config.rate_limit)
        self.streams = StreamSlots(config.max_streams_per_client)
        self.shared = shared

    async def take(self, identity: str) -> float:
        """Spend one request: 0 when allowed, else the seconds until the next one is."""
        if self.rate.per_minute <= 0:
            return 0.0
        if self.shared is not None:
            wait = await self.shared.take(identity, self.rate.per_minute)
            if wait is not None:
                return wait
        return self.rate.take(identity)

    async def acquire(self, identity: str) -> Callable[[], None]:
        """Take one of the client's slots, or raise TooManyStreams; the function gives it back (once)."""
        shared = self.shared
        if shared is not None:
            got = await shared.acquire(identity, self.streams.per_client)
            if got is not None:
                lease, held = got
                if lease is None:
                    raise TooManyStreams(_too_many(held))
                local = self.streams.acquire(identity, bound=False)
                done = False

                def release() -> None:
                    nonlocal done
                    if not done:
                        done = True
                        local()
                        shared.release(lease)
                return release
        return self.streams.acquire(identity)


def _too_many(count: int) -> str:
    return (f"this client already has {count} generations running, the most this relay allows "
            "(--max-streams-per-client); wait for one to finish or stop one")




def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
