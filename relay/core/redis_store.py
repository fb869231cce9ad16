"""The Redis store (``--redis URL``): streams, presence, cancels and limits shared by every instance.

Keys, all under ``--redis-prefix`` and hash-tagged by stream id so one stream's keys share a Redis
Cluster slot::

    P:{ID}:log      Redis Stream; entry ``<seq>-1`` holds ``d`` (the event's bytes) and, on the
                    terminal event only, ``e``.  An event id means the same on every instance.
    P:{ID}:meta     hash: ``owner`` (the token digest), ``kind``, ``model``, ``by`` (the producing
                    instance), ``fence`` (the lease's fencing number), ``end`` (the terminal's
                    seq, once there is one), ``interrupted`` (that terminal was appended because
                    the producer was gone), ``lost`` (the log here stops short, and memory no
                    longer holds the rest).
    P:{ID}:owner    the producer's lease: set with a short TTL and renewed; gone = producer gone.
    P:{ID}:seen     a reader on another instance, set with a short TTL and refreshed (presence).
    P:{ID}:input    a background response's input items (JSON), for ``/input_items`` anywhere.
    P:{rate:WHO}    a client's token bucket;  P:{slots:WHO}: its running generations (leases).
    P:cooldown:NAME an upstream's cooldown seen by some instance, expiring with it (a new
                    instance starts knowing it);  P:origin:ID: where a response was made.
    P:cancel        pub/sub channel: a stream id to stop, for whichever instance produces it.
    P:upstreams     pub/sub channel: an upstream's cooldown (or recovery), at once to the others.

Jobs, one module each: the producer's copies, leases and repairs (relay/core/redis_writer.py);
the readers elsewhere and their one multiplexed read (relay/core/redis_follow.py); cancels,
cooldowns and response origins (relay/core/redis_news.py); per-client limits
(relay/core/redis_limits.py); the lookups and reads a resume makes (relay/core/redis_reads.py);
the atomic steps (relay/core/redis_scripts.py).  This module holds the connection and its
health, and the refresher.

**Failing soft.** Every wait for Redis on a request's path is bounded by ``--redis-timeout``.
Past it, Redis counts as away until a round trip succeeds again: requests are served from this
process (limits counted per process, new streams started at once, a resume of a stream held
here served from memory) and only a resume of another instance's stream gets a retriable
``503``.  Copies that fell behind meanwhile are rewritten from memory when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from relay.config import Config
from relay.core.redis_follow import Followers
from relay.core.redis_health import AWAY, AWAY_OR_FAILED, RedisError, RedisHealth, reason
from relay.core.redis_limits import RedisLimits
from relay.core.redis_news import News
from relay.core.redis_reads import Reads
from relay.core.redis_scripts import Scripts
from relay.core.redis_writer import StreamCopy, Writer
from relay.core.store import Remote, Store, StoreUnavailable
from relay.extras import install_hint

if TYPE_CHECKING:
    from relay.core.generation import Generation
    from relay.core.registry import Registry
    from relay.metrics import Metrics
    from relay.upstream.pool import Pool

#: What the producer's readers get when a reader elsewhere ended the stream while this process
#: was stopped or cut off (the same words as relay/http/chat_wire.py's interrupted event).
INTERRUPTED: Final = "the relay process producing this answer stopped before it ended; what it generated is above; " \
                     "send the request again"

log = logging.getLogger("relay.redis")

#: The least a lookup that finds nothing waits before it looks again (seconds).
MISS_WAIT = 0.04

class RedisStore(RedisHealth, Store):
    shared = True

    def __init__(self, config: Config, client: Any, readers: Any = None, *, cluster: bool = False) -> None:
        super().__init__(config)
        #: Redis Cluster (``redis+cluster://``): no keyless commands in pipelines, no multi-slot reads.
        self.cluster = cluster
        self.redis = client
        #: The followers' one blocking read (a single connection of its own).
        self.readers = readers if readers is not None else client
        self.prefix = config.redis_prefix
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.registry: Registry | None = None
        #: The bound on one of the writer's pipelines (many streams' events in one round trip).
        self.write_bound = max(1.0, 4 * config.redis_timeout)
        # The key lifetimes, in Redis's milliseconds, for every part of the store: the producer's
        # lease, a reader's presence, a stream's keys while it runs and once it has finished.
        self.owner_ms = max(1, int(config.owner_ttl * 1000))
        self.presence_ms = max(1, int(config.presence_ttl * 1000))
        self.running_ms = int((config.attach_timeout + config.total_timeout + config.stream_ttl) * 1000)
        self.kept_ms = max(1, int(config.stream_ttl * 1000))
        self.scripts = Scripts()
        self.writer = Writer(self, self._fenced)
        self.followers = Followers(self, self.readers, per_stream=cluster)
        #: How long a lookup that misses waits before it looks again: several of the writers'
        #: flush delays and round trips (a busy Redis answers in milliseconds, not microseconds).
        self.reads = Reads(self, MISS_WAIT + 4 * config.redis_flush_ms / 1000)
        self.news = News(self)
        self.shared_limits = RedisLimits(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.run_id: bytes | None = None
        #: Times Redis was found restarted (its run_id changed) and the copies rewritten.
        self.restarts_seen = 0
        #: Streams followed from Redis for readers of this process (resumes of another's streams).
        self.remote_reads = 0
        #: Rounds of lease renewal done.
        self.refreshes = 0

    def key(self, stream_id: str, part: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}:{part}"

    # -- the Store interface's wiring ----------------------------------------------------

    def attach(self, registry: Registry, metrics: Metrics | None, pool: Pool) -> None:
        self.registry = registry
        self.metrics = metrics
        self.news.share(pool)

    def limits(self) -> RedisLimits:
        return self.shared_limits

    def health(self) -> dict[str, object]:
        return {"kind": "redis", "available": self.available, "round_trips": self.writer.round_trips,
                "events_written": self.writer.events_written, "followed": self.followers.streams}

    def idle(self) -> bool:
        """Nothing of this process's copies is queued, in flight or waiting for a repair."""
        return self.writer.idle()

    @property
    def round_trips(self) -> int:
        return self.writer.round_trips

    @property
    def events_written(self) -> int:
        return self.writer.events_written

    # -- start and end -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self.redis.ping()
                memory = await self.redis.info("memory")
                server = await self.redis.info("server")
                await self.scripts.load(self.redis)
        except TimeoutError:
            raise SystemExit(f"relay: error: Redis at {self._where} did not answer within 10 s") from None
        except RedisError as exc:
            raise SystemExit(f"relay: error: cannot use Redis at {self._where}: {reason(exc)}") from None
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        if int(memory.get("maxmemory", 0) or 0) and policy != "noeviction":
            raise SystemExit(f"relay: error: Redis at {self._where} evicts keys (maxmemory-policy {policy}): an "
                             "evicted owner key would read as a crash; set maxmemory-policy noeviction")
        self.run_id = str(server.get("run_id", "")).encode()
        log.info("sharing streams through Redis at %s (instance %s)", self._where, self.instance)
        loops = ((self.writer.run(), "redis-writer"), (self._refresher(), "redis-refresher"),
                 (self.news.run(), "redis-news"))
        self._loops = [asyncio.create_task(coro, name=name) for coro, name in loops]
        for task in self._loops:
            task.add_done_callback(_died)
        self.followers.start()

    async def signing_secret(self) -> bytes:
        """The events-URL secret every instance shares (made by whichever asks first)."""
        key = f"{self.prefix}:signing-key"
        await self.redis.set(key, secrets.token_bytes(32), nx=True)
        value: bytes = await self.redis.get(key)
        return value

    async def close(self) -> None:
        # The last events (the shutdown ends) go out before the connection closes: bounded, and
        # not waited for at all once Redis is known to be away (they would only time out).
        try:
            async with asyncio.timeout(5):
                while self.available and not self.writer.idle():
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        if not self.writer.idle():
            log.warning("Redis: some copies were not written at shutdown (Redis %s)",
                        "is away" if not self.available else "was too slow")
        await self.followers.close()
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        # Bounded: closing a TLS connection waits for the peer's close_notify, which may not come.
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        for client in {id(self.redis): self.redis, id(self.readers): self.readers}.values():
            try:
                await asyncio.wait_for(client.aclose(), timeout=2)
                pool = getattr(client, "connection_pool", None)  # (a cluster client has one per node)
                if pool is not None:
                    await asyncio.wait_for(pool.disconnect(), timeout=2)
            except (RedisError, OSError, TimeoutError):
                pass

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task until it is done (cancelled at close)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def repair_soon(self) -> None:
        if self.writer.repair():
            log.info("Redis: rewriting the copies that fell behind")

    async def _refresher(self) -> None:
        """Renew leases (streams and client slots), notice a Redis that restarted, and repair."""
        interval = self.config.owner_ttl / 3
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            began = time.perf_counter()
            at = loop.time()
            copies = self.writer.renewals()
            try:
                async with asyncio.timeout(self.write_bound):
                    if not self.scripts.loaded:
                        await self.scripts.load(self.redis)
                    pipe = self.redis.pipeline(transaction=False)
                    for copy in copies:
                        self.scripts.queue(pipe, "renew", *self.writer.renewal(copy))
                    for lease, key in list(self.shared_limits.leases.items()):
                        self.scripts.queue(pipe, "slot", [key], [lease, self.owner_ms * 2])
                    results = await pipe.execute(raise_on_error=False) if copies or self.shared_limits.leases else []
                    server = await self.redis.info("server")
            except AWAY as exc:
                self.count("refresh", None)
                self.lost_redis(exc)
                continue
            self.count("refresh", began)
            self.refreshes += 1
            if any(isinstance(r, Exception) and self.scripts.missing(r) for r in results):
                self.scripts.lost()
            for copy, result in zip(copies, results):
                self.writer.renewed(copy, result, at)
            run_id = str(server.get("run_id", "")).encode()
            if run_id != self.run_id:
                log.warning("Redis at %s restarted (its data may be gone): writing the streams held here again",
                            self._where)
                self.run_id = run_id
                self.restarts_seen += 1
                self.scripts.lost()
                self.writer.restarted()
            if self.available:
                self.repair_soon()
            else:
                self.back()

    # -- the producer's side -------------------------------------------------------------

    def mirror(self, gen: Generation) -> StreamCopy:
        return self.writer.add(gen)

    async def ready(self, stream_id: str) -> None:
        copy = self.writer.owned.get(stream_id)
        if copy is None or not self.available:
            return
        try:
            await asyncio.wait_for(asyncio.shield(copy.written), timeout=self.bound)
        except TimeoutError:
            pass  # served from here meanwhile; another instance finds it once Redis has it

    def _fenced(self, gen: Generation) -> None:
        gen.cancel("interrupted", INTERRUPTED)

    def keep_input(self, stream_id: str, data: bytes) -> None:
        self.keep(asyncio.get_running_loop().create_task(self._keep_input(self.key(stream_id, "input"), data,
                                                                          self.running_ms)))

    async def _keep_input(self, key: str, data: bytes, ttl: int) -> None:
        try:
            async with asyncio.timeout(self.write_bound):
                await self.redis.set(key, data, px=ttl)
        except AWAY_OR_FAILED as exc:
            log.warning("Redis: a background response's input was not kept (%s); other instances cannot list it",
                        self.reason(exc))

    async def input_of(self, stream_id: str) -> bytes | None:
        try:
            value: bytes | None = await self.ask(self.redis.get(self.key(stream_id, "input")))
        except RedisError as exc:
            raise StoreUnavailable(f"the shared store (Redis) failed: {reason(exc)}") from None
        return value

    # -- what a resume asks (relay/core/redis_reads.py) ------------------------------------

    async def listened(self, stream_id: str) -> bool:
        return await self.reads.listened(stream_id)

    async def lookup(self, stream_id: str) -> Remote | None:
        return await self.reads.lookup(stream_id)

    async def events(self, remote: Remote) -> list[bytes]:
        return await self.reads.events(remote)

    def follow(self, remote: Remote, pos: int, interrupted: bytes) -> AsyncIterator[bytes]:
        return self.reads.follow(remote, pos, interrupted)

    async def cancel(self, stream_id: str) -> None:
        await self.reads.cancel(stream_id)


def _died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Redis: the %s task failed", task.get_name(), exc_info=task.exception())


def open_store(config: Config) -> Store:
    """The store the settings ask for: memory, or Redis (whose client library is an optional extra)."""
    if config.redis_url is None:
        return Store()
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise SystemExit(f"relay: error: --redis needs the redis library: {install_hint('redis')}") from None
    # The library's own socket timeout is only a backstop: every wait on a request's path is
    # bounded by --redis-timeout (RedisStore.ask), the followers' read by its block time plus it.
    common: dict[str, Any] = dict(password=config.redis_password, decode_responses=False, socket_connect_timeout=5,
                                  socket_timeout=max(10.0, config.presence_ttl * 2), client_name="relay")
    # Commands share a bounded pool and queue for a free connection (a burst of a thousand new
    # streams must wait a moment, not fail).  The followers' one blocking read has a connection
    # of its own (relay/core/redis_follow.py), so it never holds one the writer needs.
    scheme, sep, rest = config.redis_url.partition("://")
    if scheme.endswith("+cluster"):
        # Redis Cluster: redis-py's cluster client finds every node from the one named, routes
        # each stream's commands by its hash tag and follows failovers.  A multiplexed XREAD
        # cannot span slots there, so the followers read one blocking read per stream
        # (relay/core/redis_follow.py).
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import ConstantBackoff

        url = scheme.removesuffix("+cluster") + sep + rest
        # A failover takes the node timeout and an election: the topology is asked for again every
        # quarter second until it shows the new master (the library's default backoff after
        # failed refreshes grows to seconds, which every request would then wait out as 503s).
        cluster = RedisCluster.from_url(url, **{k: v for k, v in common.items() if k != "client_name"},
                                        max_connections=256, topology_refresh_min_interval=0.25,
                                        retry=Retry(ConstantBackoff(0.25), 2))
        return RedisStore(config, cluster, cluster, cluster=True)
    commands = aioredis.BlockingConnectionPool.from_url(config.redis_url, max_connections=64, timeout=10, **common)
    readers = aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(config.redis_url, max_connections=1,
                                                                              **common),
                             single_connection_client=True)
    return RedisStore(config, aioredis.Redis(connection_pool=commands), readers)
