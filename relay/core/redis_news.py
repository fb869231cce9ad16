"""What every instance shares besides streams, through Redis: cancels, upstream cooldowns, and
where each Responses API response was made.

Cancels and cooldowns travel as pub/sub messages (at once, to the instances running now);
cooldowns are also kept as keys that expire with them (``P:cooldown:NAME``), so an instance
that starts later knows them.  Every step here fails soft: Redis away means this instance
decides alone (routes as any request, counts its own cooldowns) until it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from relay.core.redis_store import RedisStore
    from relay.upstream.pool import Pool

log = logging.getLogger("relay.redis")

#: How long Redis remembers where a response was made (OpenAI keeps stored responses 30 days).
RESPONSE_ORIGIN_TTL: Final = 30 * 24 * 3600.0


class News:
    """Cancels, cooldowns and response origins shared with every instance."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.pool: Pool | None = None

    def share(self, pool: Pool) -> None:
        """Upstream cooldowns started here reach every instance, and theirs reach this one; so does
        where each Responses API response was made (its conversation continues there)."""
        self.pool = pool
        pool.on_health = self._publish_health
        pool.on_origin = self._keep_origin
        pool.find_origin = self._find_origin
        self.store.keep(asyncio.get_running_loop().create_task(self._load_cooldowns()))

    def _cooldown_key(self, name: str) -> str:
        return f"{self.store.prefix}:cooldown:{name}"

    async def _load_cooldowns(self) -> None:
        """Cooldowns other instances started before this one: an upstream they know is down is not
        tried here first (the channel only tells instances that were listening then)."""
        if self.pool is None:
            return
        names = [m.name for m in self.pool.members]
        try:
            async with asyncio.timeout(self.store.write_bound):
                pipe = self.store.redis.pipeline(transaction=False)
                for name in names:
                    pipe.get(self._cooldown_key(name))
                    pipe.pttl(self._cooldown_key(name))
                answers = await pipe.execute()
        except self.store.away_or_failed as exc:
            log.warning("Redis: could not read the upstream cooldowns: %s", self.store.reason(exc))
            return
        for i, name in enumerate(names):
            value, ttl = answers[2 * i], answers[2 * i + 1]
            if value and isinstance(ttl, int) and ttl > 0:
                try:
                    news = json.loads(value)
                    self.pool.heard(name, ttl / 1000, str(news["why"]), bool(news["down"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("Redis: ignoring a malformed cooldown of upstream %s", name)

    def _keep_origin(self, response_id: str, upstream: str, upstream_id: str) -> None:
        self.store.keep(asyncio.get_running_loop().create_task(self._set_origin(response_id, f"{upstream}\n{upstream_id}")))

    async def _set_origin(self, response_id: str, value: str) -> None:
        try:
            async with asyncio.timeout(self.store.write_bound):
                await self.store.redis.set(f"{self.store.prefix}:origin:{response_id}", value, px=int(RESPONSE_ORIGIN_TTL * 1000))
        except self.store.away_or_failed as exc:
            self.store.lost_redis(exc)

    async def _find_origin(self, response_id: str) -> tuple[str, str] | None:
        """Where another instance made a response; None when unknown, or when Redis cannot say
        (the request is then routed as any other: failing soft)."""
        try:
            value = await self.store.ask(self.store.redis.get(f"{self.store.prefix}:origin:{response_id}"))
        except self.store.soft:
            return None
        if not value:
            return None
        upstream, _, upstream_id = value.decode().partition("\n")
        return upstream, upstream_id

    def _publish_health(self, name: str, wait: float, why: str, down: bool) -> None:
        message = json.dumps({"from": self.store.instance, "name": name, "wait": wait, "why": why, "down": down})
        self.store.keep(asyncio.get_running_loop().create_task(self._share_health(name, wait, message)))

    async def _share_health(self, name: str, wait: float, message: str) -> None:
        try:
            async with asyncio.timeout(self.store.write_bound):
                # (two commands, not a pipeline: a cluster pipeline cannot carry PUBLISH)
                if wait > 0:
                    await self.store.redis.set(self._cooldown_key(name), message, px=max(1, int(wait * 1000)))
                else:
                    await self.store.redis.delete(self._cooldown_key(name))
                await self.store.redis.publish(f"{self.store.prefix}:upstreams", message)
        except self.store.away_or_failed as exc:
            self.store.lost_redis(exc)

    async def run(self) -> None:
        """Cancels (a stream id) and upstream health (JSON), from every instance."""
        cancels, health = f"{self.store.prefix}:cancel", f"{self.store.prefix}:upstreams"
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.subscribe(cancels, health)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                    channel = message.get("channel")
                    if (channel.decode() if isinstance(channel, bytes) else channel) == health:
                        self._heard(text)
                        continue
                    gen = self.store.registry.get(text) if self.store.registry is not None else None
                    if gen is not None:
                        gen.cancel("cancelled", "the stream was stopped by a client")
            except self.store.unavailable as exc:
                self.store.lost_redis(exc)
                await asyncio.sleep(0.5)
            except self.store.failed as exc:
                log.warning("Redis: the cancel channel failed: %s", self.store.reason(exc))
                await asyncio.sleep(0.5)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), timeout=1)
                except self.store.away_or_failed:
                    pass

    def _heard(self, text: str) -> None:
        try:
            news = json.loads(text)
            if news["from"] == self.store.instance or self.pool is None:
                return
            self.pool.heard(str(news["name"]), float(news["wait"]), str(news["why"]), bool(news["down"]))
        except (ValueError, KeyError, TypeError):
            log.warning("Redis: ignoring a malformed upstream-health message")

