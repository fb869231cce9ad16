"""The Redis store (``--redis URL``): streams, presence, cancels and limits shared by every instance.

Keys, all under ``--redis-prefix`` and hash-tagged by stream id so one stream's keys share a Redis
Cluster slot::

    P:{ID}:log      Redis Stream; entry ``<seq>-1`` holds ``d`` (the event's bytes) and, on the
                    terminal event only, ``e``.  An event id means the same on every instance.
    P:{ID}:meta     hash: ``owner`` (the token digest), ``end`` (the terminal's seq, once there
                    is one), ``interrupted`` (that terminal was appended because the producer was
                    gone), ``lost`` (the log here is incomplete).
    P:{ID}:owner    the producing instance, set with a short TTL and refreshed: gone = producer gone.
    P:{ID}:seen     a reader on another instance, set with a short TTL and refreshed (presence).
    P:{rate:WHO}    a client's token bucket;  P:{slots:WHO}: its running generations (leases).
    P:cancel        pub/sub channel: a stream id to stop, for whichever instance produces it.
    P:upstreams     pub/sub channel: an upstream's cooldown (or recovery) seen by one instance,
                    so the others skip it too.

The producer serves its own readers from memory (relay/core/generation.py); this module only
copies.  One writer per process sends what every stream appended since its last round trip as
one pipeline, with one pipeline in flight and at most ``--redis-flush-ms`` of gathering, so a
slow Redis delays remote readers, never local ones.  Its queue is bounded: a stream whose events
do not fit is marked ``lost`` (remote readers are told; local ones are unaffected).  A refresher
renews owner keys and leases and notices a Redis that restarted empty (its ``run_id`` changes):
streams still running are written again from memory where their whole log is still there, else
marked ``lost``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from relay.extras import install_hint
from relay.config import Config
from relay.core.generation import ResumeExpired
from relay.core.store import Remote, Store, StoreUnavailable

if TYPE_CHECKING:
    from relay.core.generation import Generation
    from relay.core.registry import Registry
    from relay.metrics import Metrics
    from relay.upstream.pool import Pool

#: How long Redis remembers where a response was made (OpenAI keeps stored responses 30 days).
RESPONSE_ORIGIN_TTL: Final = 30 * 24 * 3600.0

log = logging.getLogger("relay.redis")

#: The least a lookup that finds nothing waits before it looks again (seconds).
MISS_WAIT = 0.04

#: Errors that mean "Redis is not there now" (connection refused, reset, timed out, loading).
try:
    from redis import exceptions as _rexc

    UNAVAILABLE: tuple[type[BaseException], ...] = (_rexc.ConnectionError, _rexc.TimeoutError,
                                                     _rexc.BusyLoadingError, OSError)
    RedisError: type[Exception] = _rexc.RedisError
except ImportError:  # the optional extra is missing: open_store says so before anything runs
    UNAVAILABLE = (OSError,)
    RedisError = OSError

# Appends the ``interrupted`` end once, only if the log has no terminal event and no owner:
# every reader, on any instance, then sees the same event with the same id.  Returns the
# terminal's seq, or nil while the owner lives.
_INTERRUPT: Final = """
local ended = redis.call('HGET', KEYS[1], 'end')
if ended then return tonumber(ended) end
if redis.call('EXISTS', KEYS[3]) == 1 then return nil end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = 0
if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
redis.call('XADD', KEYS[2], seq .. '-1', 'd', ARGV[1], 'e', '1')
redis.call('HSET', KEYS[1], 'end', seq, 'interrupted', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return seq
"""

# A token bucket of ``ARGV[1]`` requests per minute (bursts of as many), on Redis's clock so every
# instance agrees.  Returns the seconds to wait, as a string ("0": allowed).
_TAKE: Final = """
local per_minute = tonumber(ARGV[1])
local rate = per_minute / 60
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'a')
local tokens = tonumber(state[1]) or per_minute
local at = tonumber(state[2]) or now
tokens = math.min(per_minute, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'a', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(60000 + 1000))
return tostring(wait)
"""

# A lease on one of ``ARGV[1]`` slots, expiring after ``ARGV[3]`` ms unless renewed, so an instance
# that dies gives its slots back.  Returns the slots held after the call, negative when refused.
_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return -held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return held + 1
"""

_RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

def where(url: str) -> str:
    """Where a Redis is, for log lines and errors: scheme, host and port, never a credential."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def _after(pos: int) -> str:
    """The XREAD position whose next entry is ``pos``."""
    return f"{pos - 1}-1" if pos > 0 else "0-0"


class _Mirror:
    """One generation's copy: queued through the store's writer."""

    __slots__ = ("created", "gen", "lost", "recheck", "store", "written")

    def __init__(self, store: RedisStore, gen: Generation) -> None:
        self.store = store
        self.gen = gen
        self.recheck = store.config.presence_ttl
        #: Its meta and owner key have reached Redis (others can find it).
        self.written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.created = False
        #: Its log in Redis is incomplete; nothing more is written for it until a repair.
        self.lost = False

    def append(self, seq: int, data: bytes, last: bool) -> None:
        self.store._queue_event(self, seq, data, last)

    async def listened(self) -> bool:
        return await self.store.listened(self.gen.id)


class RedisStore(Store):
    shared = True

    def __init__(self, config: Config, client: Any, readers: Any = None) -> None:
        self.config = config
        self.redis = client
        #: For remote readers' blocking reads (a connection each while they wait).
        self.readers = readers if readers is not None else client
        self.prefix = config.redis_prefix
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._where = where(config.redis_url or "")
        self.registry: Registry | None = None
        self.pool: Pool | None = None
        self._owner_ms = max(1, int(config.owner_ttl * 1000))
        self._presence_ms = max(1, int(config.presence_ttl * 1000))
        self._running_ms = int((config.attach_timeout + config.total_timeout + config.stream_ttl) * 1000)
        self._kept_ms = max(1, int(config.stream_ttl * 1000))
        #: How long a lookup that misses waits before it looks again: several of the writers'
        #: flush delays and round trips (a busy Redis answers in milliseconds, not microseconds).
        self._miss_wait = MISS_WAIT + 4 * config.redis_flush_ms / 1000
        # What the writer sends next: ("event", mirror, seq, data, last) | ("create", mirror) | ("lost", mirror)
        self._pending: list[tuple[Any, ...]] = []
        self._queued_events = 0
        self._wake = asyncio.Event()
        #: The streams this process produces, by id (``ready`` finds one for every 201).
        self._owned: dict[str, _Mirror] = {}
        self._leases: dict[str, str] = {}  # lease id -> slots key
        self._tasks: list[asyncio.Task[None]] = []
        self._run_id: bytes | None = None
        self.available = True
        #: Times Redis was found restarted (its run_id changed) and the running streams rewritten.
        self.restarts_seen = 0
        #: Streams followed from Redis for readers of this process (resumes of another's streams).
        self.remote_reads = 0
        #: Rounds of owner-key and lease renewal done.
        self.refreshes = 0
        #: A pipeline of the writer is in flight.
        self.sending = False
        self.round_trips = 0  # writer pipelines sent (bench/: round trips per event)
        #: Round-trip times and errors, when metrics are on (relay/metrics.py).
        self.metrics: Metrics | None = None
        self.events_written = 0
        self._interrupt = client.register_script(_INTERRUPT)
        self._take = client.register_script(_TAKE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    def key(self, stream_id: str, part: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}:{part}"

    # -- start and end -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self.redis.ping()
                memory = await self.redis.info("memory")
                server = await self.redis.info("server")
        except TimeoutError:
            raise SystemExit(f"relay: error: Redis at {self._where} did not answer within 10 s") from None
        except RedisError as exc:
            raise SystemExit(f"relay: error: cannot use Redis at {self._where}: {_reason(exc)}") from None
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        if int(memory.get("maxmemory", 0) or 0) and policy != "noeviction":
            raise SystemExit(f"relay: error: Redis at {self._where} evicts keys (maxmemory-policy {policy}): an "
                             "evicted owner key would read as a crash; set maxmemory-policy noeviction")
        self._run_id = str(server.get("run_id", "")).encode()
        log.info("sharing streams through Redis at %s (instance %s)", self._where, self.instance)
        loop_tasks = ((self._writer(), "redis-writer"), (self._refresher(), "redis-refresher"),
                      (self._cancels(), "redis-cancels"))
        self._tasks = [asyncio.create_task(coro, name=name) for coro, name in loop_tasks]
        for task in self._tasks:
            task.add_done_callback(_died)

    async def signing_secret(self) -> bytes:
        """The events-URL secret every instance shares (made by whichever asks first)."""
        key = f"{self.prefix}:signing-key"
        await self.redis.set(key, secrets.token_bytes(32), nx=True)
        value: bytes = await self.redis.get(key)
        return value

    async def close(self) -> None:
        # The last events (the shutdown ends) go out before the connection closes, bounded.
        self._wake.set()
        try:
            async with asyncio.timeout(5):
                while self._pending or self.sending:  # (a batch in flight holds the last ends too)
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("Redis: %d writes not sent at shutdown", len(self._pending))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Bounded: closing a TLS connection waits for the peer's close_notify, which may not come.
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        for client in {id(self.redis): self.redis, id(self.readers): self.readers}.values():
            try:
                await asyncio.wait_for(client.aclose(), timeout=2)
                await asyncio.wait_for(client.connection_pool.disconnect(), timeout=2)
            except (RedisError, OSError, TimeoutError):
                pass

    # -- the producer's side -------------------------------------------------------------

    def mirror(self, gen: Generation) -> _Mirror:
        mirror = _Mirror(self, gen)
        self._owned[gen.id] = mirror
        self._pending.append(("create", mirror))
        self._wake.set()
        return mirror

    async def ready(self, stream_id: str) -> None:
        mirror = self._owned.get(stream_id)
        if mirror is not None:
            try:
                await asyncio.wait_for(asyncio.shield(mirror.written), timeout=self.config.owner_ttl)
            except TimeoutError:
                pass

    def _queue_event(self, mirror: _Mirror, seq: int, data: bytes, last: bool) -> None:
        if mirror.lost:
            if last:
                self._owned.pop(mirror.gen.id, None)
            return
        if self._queued_events >= self.config.redis_queue:
            # Redis is not keeping up: this stream's copy is given up rather than memory grown.
            self._lose(mirror, "the queue of writes to Redis is full")
            if last:
                self._owned.pop(mirror.gen.id, None)
            return
        self._pending.append(("event", mirror, seq, data, last))
        self._queued_events += 1
        if not self._wake.is_set():
            self._wake.set()

    def _lose(self, mirror: _Mirror, why: str) -> None:
        if mirror.lost:
            return
        mirror.lost = True
        log.warning("stream %s: its copy in Redis is incomplete (%s); readers elsewhere are told", mirror.gen.id, why)
        self._pending.append(("lost", mirror))

    async def _writer(self) -> None:
        delay = self.config.redis_flush_ms / 1000
        while True:
            await self._wake.wait()
            if delay:
                await asyncio.sleep(delay)  # gather more streams' events into this round trip
            self._wake.clear()
            batch, self._pending = self._pending, []
            self._queued_events = 0
            if batch:
                self.sending = True
                try:
                    await self._send(batch)
                finally:
                    self.sending = False

    async def _send(self, batch: list[tuple[Any, ...]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        owners: list[_Mirror] = []
        events = 0
        for op in batch:
            kind, mirror = op[0], op[1]
            gen = mirror.gen
            meta, logkey = self.key(gen.id, "meta"), self.key(gen.id, "log")
            if kind == "create":
                pipe.hset(meta, mapping={"owner": gen.owner or "", "model": gen.model, "kind": gen.kind})
                pipe.pexpire(meta, self._running_ms)
                pipe.set(self.key(gen.id, "owner"), self.instance, px=self._owner_ms)
                owners += [mirror] * 3
            elif kind == "reset":
                pipe.delete(logkey, meta)
                owners += [mirror]
            elif kind == "lost":
                pipe.hset(meta, mapping={"owner": gen.owner or "", "model": gen.model, "kind": gen.kind, "lost": "1"})
                pipe.pexpire(meta, self._kept_ms if gen.finished else self._running_ms)
                owners += [mirror] * 2
            elif not mirror.lost:
                _, _, seq, data, last = op
                fields = {"d": data, "e": "1"} if last else {"d": data}
                pipe.xadd(logkey, fields, id=f"{seq}-1", maxlen=self.config.redis_log_events, approximate=True)
                owners.append(mirror)
                events += 1
                if seq == 0 or last:
                    pipe.pexpire(logkey, self._kept_ms if last else self._running_ms)
                    owners.append(mirror)
                if last:
                    pipe.hset(meta, "end", seq)
                    pipe.pexpire(meta, self._kept_ms)
                    pipe.delete(self.key(gen.id, "owner"))
                    owners += [mirror] * 3
        began = time.perf_counter()
        try:
            results = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE as exc:
            self._count("write", None)
            self._lost_redis(exc)
            # What was in flight is gone: the streams that lost events are marked when Redis is
            # back; the ones not yet created are created then.
            retry = [op for op in batch if op[0] in ("reset", "create", "lost")]
            for op in batch:
                if op[0] == "event":
                    self._lose(op[1], "Redis could not be reached")
            self._pending[:0] = retry
            await asyncio.sleep(0.5)  # not a busy loop while Redis is away
            if self._pending:
                self._wake.set()
            return
        self._count("write", began)
        self.round_trips += 1
        self.events_written += events
        self._back()
        for mirror, result in zip(owners, results):
            if isinstance(result, Exception):
                # Most likely another instance ended the stream as interrupted (our owner key
                # lapsed): our later events are refused, which is what keeps every reader's
                # view the same.
                self._lose(mirror, f"Redis refused a write: {_reason(result)}")
        for op in batch:
            mirror = op[1]
            if op[0] == "create" and not mirror.written.done():
                mirror.created = True
                mirror.written.set_result(None)
            if op[0] == "event" and op[4]:
                self._owned.pop(mirror.gen.id, None)

    def _count(self, op: str, began: float | None) -> None:
        """One round trip for the metrics: its time since ``began``, or (None) an error."""
        if self.metrics is None:
            return
        if began is None:
            self.metrics.redis_errors.labels(op).inc()
        else:
            self.metrics.redis_round_trip.labels(op).observe(time.perf_counter() - began)

    async def _refresher(self) -> None:
        interval = self.config.owner_ttl / 3
        while True:
            await asyncio.sleep(interval)
            began = time.perf_counter()
            try:
                pipe = self.redis.pipeline(transaction=False)
                for mirror in self._owned.values():
                    if mirror.created and not mirror.gen.finished:
                        pipe.set(self.key(mirror.gen.id, "owner"), self.instance, px=self._owner_ms)
                for lease, key in list(self._leases.items()):
                    await self._renew(keys=[key], args=[lease, self._owner_ms * 2], client=pipe)  # queued
                await pipe.execute()
                self._count("refresh", began)
                server = await self.redis.info("server")
            except UNAVAILABLE as exc:
                self._count("refresh", None)
                self._lost_redis(exc)
                continue
            except RedisError as exc:
                self._count("refresh", None)
                log.warning("Redis: refreshing owner keys failed: %s", _reason(exc))
                continue
            self._back()
            self.refreshes += 1
            run_id = str(server.get("run_id", "")).encode()
            if run_id != self._run_id:
                log.warning("Redis at %s restarted (its data may be gone): writing the running streams again",
                            self._where)
                self._run_id = run_id
                self._repair_all()

    def _repair_all(self) -> None:
        """Redis restarted: write every running stream again from the start (its log there is
        reset first, so what was written since the restart is not doubled), or mark it lost when
        its start has left memory."""
        self.restarts_seen += 1
        for mirror in list(self._owned.values()):
            if mirror.gen.finished:
                continue
            base, events = mirror.gen.logged()
            mirror.lost = False
            self._pending.append(("reset", mirror))
            self._pending.append(("create", mirror))
            if base == 0:
                for seq, data in enumerate(events):
                    self._pending.append(("event", mirror, seq, data, False))
                    self._queued_events += 1
            else:
                self._lose(mirror, "Redis restarted and the start of the stream has left memory")
        self._wake.set()

    def _lost_redis(self, exc: BaseException) -> None:
        if self.available:
            self.available = False
            log.error("Redis at %s is unreachable (%s): streams go on for their local readers, resumes "
                      "elsewhere get 503 and per-client limits are counted per process until it is back",
                      self._where, _reason(exc))

    def _back(self) -> None:
        if not self.available:
            self.available = True
            log.warning("Redis at %s is reachable again: limits are shared again", self._where)

    def share_health(self, pool: Pool) -> None:
        """Upstream cooldowns started here reach every instance, and theirs reach this one; so does
        where each Responses API response was made (its conversation continues there)."""
        self.pool = pool
        pool.on_health = self._publish_health
        pool.on_origin = self._keep_origin
        pool.find_origin = self._find_origin

    def _keep_origin(self, response_id: str, upstream: str, upstream_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._set_origin(response_id, f"{upstream}\n{upstream_id}"))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _set_origin(self, response_id: str, value: str) -> None:
        try:
            await self.redis.set(f"{self.prefix}:origin:{response_id}", value, px=int(RESPONSE_ORIGIN_TTL * 1000))
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)

    async def _find_origin(self, response_id: str) -> tuple[str, str] | None:
        """Where another instance made a response; None when unknown, or when Redis cannot say
        (the request is then routed as any other: failing soft)."""
        try:
            value = await self.redis.get(f"{self.prefix}:origin:{response_id}")
        except (RedisError, OSError):
            return None
        if not value:
            return None
        upstream, _, upstream_id = value.decode().partition("\n")
        return upstream, upstream_id

    def _publish_health(self, name: str, wait: float, why: str, down: bool) -> None:
        message = json.dumps({"from": self.instance, "name": name, "wait": wait, "why": why, "down": down})
        task = asyncio.get_running_loop().create_task(self._publish(f"{self.prefix}:upstreams", message))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _publish(self, channel: str, message: str) -> None:
        try:
            await self.redis.publish(channel, message)
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)

    async def _cancels(self) -> None:
        """Cancels (a stream id) and upstream health (JSON), from every instance."""
        cancels, health = f"{self.prefix}:cancel", f"{self.prefix}:upstreams"
        while True:
            pubsub = self.readers.pubsub()
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
                    gen = self.registry.get(text) if self.registry is not None else None
                    if gen is not None:
                        gen.cancel("cancelled", "the stream was stopped by a client")
            except UNAVAILABLE as exc:
                self._lost_redis(exc)
                await asyncio.sleep(0.5)
            except RedisError as exc:
                log.warning("Redis: the cancel channel failed: %s", _reason(exc))
                await asyncio.sleep(0.5)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), timeout=1)
                except (RedisError, OSError, TimeoutError):
                    pass

    def _heard(self, text: str) -> None:
        try:
            news = json.loads(text)
            if news["from"] == self.instance or self.pool is None:
                return
            self.pool.heard(str(news["name"]), float(news["wait"]), str(news["why"]), bool(news["down"]))
        except (ValueError, KeyError, TypeError):
            log.warning("Redis: ignoring a malformed upstream-health message")

    # -- readers elsewhere ---------------------------------------------------------------

    async def listened(self, stream_id: str) -> bool:
        try:
            return bool(await self.redis.exists(self.key(stream_id, "seen")))
        except (RedisError, OSError):
            return False

    async def lookup(self, stream_id: str) -> Remote | None:
        key = self.key(stream_id, "meta")
        try:
            meta = await self.redis.hgetall(key)
            if not meta:
                # A stream announced a moment ago elsewhere may not be here yet: its producer's
                # writer sends it after --redis-flush-ms and a round trip, while the client has
                # its id (the start event) at once.  A 404 would end an EventSource for good.
                await asyncio.sleep(self._miss_wait)
                meta = await self.redis.hgetall(key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the shared store (Redis) cannot be reached: {_reason(exc)}") from None
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode() or None
        end = meta.get(b"end")
        return Remote(stream_id, owner, int(end) if end is not None else None, unreplayable=b"lost" in meta,
                      interrupted=b"interrupted" in meta, kind=meta.get(b"kind", b"chat").decode())

    async def events(self, remote: Remote) -> list[bytes]:
        try:
            entries = await self.redis.xrange(self.key(remote.id, "log"), "-", "+")
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"the shared store (Redis) cannot be reached: {_reason(exc)}") from None
        return [fields[b"d"] for _, fields in entries]

    async def follow(self, remote: Remote, pos: int, interrupted: bytes) -> AsyncIterator[bytes]:
        self.remote_reads += 1
        logkey = self.key(remote.id, "log")
        keys = [self.key(remote.id, "meta"), logkey, self.key(remote.id, "owner")]
        seen = self.key(remote.id, "seen")
        block_ms = max(10, self._presence_ms // 3)
        loop = asyncio.get_running_loop()
        refresh_at = 0.0
        last = _after(pos)
        end = remote.end
        try:
            first = await self.redis.xrange(logkey, "-", "+", count=1)
            if first and _seq_of(first[0][0]) > pos and (end is None or pos <= end):
                raise ResumeExpired
            while True:
                if end is not None and pos > end:
                    # The client is past what reached Redis (it read the producer's memory): the
                    # terminal event is all there is for it.
                    entry = await self.redis.xrange(logkey, f"{end}-1", f"{end}-1")
                    if entry:
                        yield entry[0][1][b"d"]
                    return
                if loop.time() >= refresh_at:
                    await self.redis.set(seen, b"1", px=self._presence_ms)
                    refresh_at = loop.time() + self.config.presence_ttl / 3
                answer = await self.readers.xread({logkey: last}, count=1000, block=block_ms)
                if answer:
                    entries = answer[0][1]
                    out = []
                    done = False
                    for entry_id, fields in entries:
                        out.append(fields[b"d"])
                        last = entry_id
                        pos = _seq_of(entry_id) + 1
                        if b"e" in fields:
                            done = True
                            break
                    yield b"".join(out)
                    if done:
                        return
                    continue
                # Nothing for a while: is the producer still there?
                ended = await self._interrupt(keys=keys, args=[interrupted, self._kept_ms])
                if ended is not None:
                    if int(ended) < 0:
                        return  # the stream expired meanwhile: nothing more to send
                    end = int(ended)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"the shared store (Redis) was lost: {_reason(exc)}") from None

    async def cancel(self, stream_id: str) -> None:
        try:
            await self.redis.publish(f"{self.prefix}:cancel", stream_id)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the shared store (Redis) cannot be reached: {_reason(exc)}") from None

    # -- limits across instances ---------------------------------------------------------

    async def take(self, identity: str, per_minute: int) -> float | None:
        """Seconds to wait before the client's next request (0: go ahead); None: Redis is away."""
        try:
            wait = await self._take(keys=[f"{self.prefix}:{{rate:{identity}}}"], args=[per_minute])
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)
            return None
        self._back()
        return float(wait)

    async def acquire(self, identity: str, per_client: int) -> tuple[str | None, int] | None:
        """(a lease, slots held) or (None, slots held) when refused; None: Redis is away."""
        key = f"{self.prefix}:{{slots:{identity}}}"
        lease = secrets.token_hex(8)
        try:
            held = int(await self._acquire(keys=[key], args=[per_client, lease, self._owner_ms * 2]))
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)
            return None
        self._back()
        if held < 0:
            return None, -held
        self._leases[lease] = key
        return lease, held

    def release(self, lease: str) -> None:
        key = self._leases.pop(lease, None)
        if key is not None:
            task = asyncio.get_running_loop().create_task(self._release(key, lease))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _release(self, key: str, lease: str) -> None:
        try:
            await self.redis.zrem(key, lease)
        except (RedisError, OSError):
            pass  # its TTL gives it back


def _died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Redis: the %s task failed", task.get_name(), exc_info=task.exception())


def _reason(exc: BaseException) -> str:
    """An error's text without anything that could be a credential."""
    text = str(exc) or type(exc).__name__
    return text.split("\n", 1)[0][:200]


def open_store(config: Config) -> Store:
    """The store the settings ask for: memory, or Redis (whose client library is an optional extra)."""
    if config.redis_url is None:
        return Store()
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise SystemExit(f"relay: error: --redis needs the redis library: {install_hint('redis')}") from None
    common: dict[str, Any] = dict(password=config.redis_password, decode_responses=False, socket_connect_timeout=5,
                                  socket_timeout=max(10.0, config.presence_ttl * 2), client_name="relay")
    # Commands share a bounded pool and queue for a free connection (a burst of a thousand new
    # streams must wait a moment, not fail); each remote reader's blocking read holds a connection
    # of its own, from a second pool, so readers can never starve the writer.
    commands = aioredis.BlockingConnectionPool.from_url(config.redis_url, max_connections=64, timeout=10, **common)
    readers = aioredis.ConnectionPool.from_url(config.redis_url, max_connections=100_000, **common)
    return RedisStore(config, aioredis.Redis(connection_pool=commands), aioredis.Redis(connection_pool=readers))
