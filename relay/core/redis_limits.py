"""Per-client limits that hold across every instance (relay/http/ratelimit.py asks; Redis keeps them).

A client's requests per minute are a token bucket and its running generations a set of leases,
each run atomically in a script on Redis's clock (relay/core/redis_scripts.py).  A lease expires
unless the refresher renews it, so an instance that dies gives its slots back.  Redis away:
every answer is None and relay/http/ratelimit.py counts per process until it is back.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.core.redis_store import RedisStore


class RedisLimits:
    """The shared store's side of the limits (``SharedLimits``)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        #: The slot leases this process holds: lease id -> its slots key (renewed by the refresher).
        self.leases: dict[str, str] = {}

    async def take(self, identity: str, per_minute: int) -> float | None:
        """Seconds to wait before the client's next request (0: go ahead); None: Redis is away."""
        try:
            wait = await self.store.ask(self.store.scripts.call(self.store.redis, "take", [f"{self.store.prefix}:{{rate:{identity}}}"],
                                                    [per_minute]))
        except self.store.soft:
            return None
        return float(wait)

    async def acquire(self, identity: str, per_client: int) -> tuple[str | None, int] | None:
        """(a lease, slots held) or (None, slots held) when refused; None: Redis is away."""
        key = f"{self.store.prefix}:{{slots:{identity}}}"
        lease = secrets.token_hex(8)
        try:
            held = int(await self.store.ask(self.store.scripts.call(self.store.redis, "acquire", [key],
                                                        [per_client, lease, self.store.owner_ms * 2])))
        except self.store.soft:
            return None
        if held < 0:
            return None, -held
        self.leases[lease] = key
        return lease, held

    def release(self, lease: str) -> None:
        key = self.leases.pop(lease, None)
        if key is not None:
            self.store.keep(asyncio.get_running_loop().create_task(self._release(key, lease)))

    async def _release(self, key: str, lease: str) -> None:
        try:
            async with asyncio.timeout(self.store.write_bound):
                await self.store.redis.zrem(key, lease)
        except self.store.away_or_failed:
            pass  # its TTL gives it back
