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

    def acquire(self, identity: str) -> Callable[[], None]:
        """Take a slot, or raise TooManyStreams; call the returned function (once) to give it back."""
        count = self._running.get(identity, 0)
        if count >= self.per_client:
            raise TooManyStreams(f"this client already has {count} generations running, the most this relay "
                                 f"allows (--max-streams-per-client); wait for one to finish or stop one")
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
    """Per-client limits: the request rate and the generations running at once."""

    def __init__(self, config: Config) -> None:
        self.rate = RateLimiter(config.rate_limit)
        self.streams = StreamSlots(config.max_streams_per_client)




def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
