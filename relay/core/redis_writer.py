"""The producer's side of the Redis store: each stream's copy, its lease, and its repair.

The producer serves its own readers from memory (relay/core/generation.py); this module only
copies.  One writer per process sends what every stream appended since its last round trip in
one round trip (one ``WRITE`` script call for all of them, relay/core/redis_scripts.py; one per
stream, pipelined, on Redis Cluster), with one in flight and at most ``--redis-flush-ms`` of
gathering, so a slow Redis delays remote readers, never local ones.

Every write is idempotent (events already in the log are skipped) and fenced, which makes the
failure handling one rule: **a copy that could not be written is marked stale and rewritten from
the producer's memory once Redis answers** (a lost round trip, a stalled or restarted Redis, a
full queue).  Only when memory no longer holds what Redis lacks is the copy marked ``lost``, and
only then does a resume elsewhere get ``store_incomplete``.  Finished streams stay here while
this process keeps them (``--stream-ttl``, ``--retention-bytes``), so a Redis restarted empty gets
them back too.

The lease: the owner key, renewed by every write and by the refresher.  The producer also keeps
its own clock on it: once the lease may have lapsed (the process was stopped, or its loop held
past the TTL), the generation holds what the upstream sends until the lease is confirmed, and a
refusal ends it with the same ``interrupted`` event readers elsewhere got.  While Redis is away
nobody can end the stream elsewhere, so the producer goes on for its readers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.core.generation import Generation
    from relay.core.redis_store import RedisStore

log = logging.getLogger("relay.redis")


class StreamCopy:
    """One generation's copy in Redis (the store's ``Mirror``)."""

    __slots__ = ("base", "ended_at", "events", "fence", "gen", "last", "lease_until", "lost", "recheck", "stale",
                 "writer", "written")

    def __init__(self, writer: Writer, gen: Generation) -> None:
        self.writer = writer
        self.gen = gen
        self.recheck = writer.store.config.presence_ttl
        #: Its first write has reached Redis (others can find it), or was given up on.
        self.written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: The fencing number Redis gave it ("0": not created yet, or to be created anew).
        self.fence = "0"
        #: Events waiting for the next round trip: ``events`` from seq ``base``, ``last`` if the
        #: final one is the terminal.
        self.events: list[bytes] = []
        self.base = 0
        self.last = False
        #: Could not be written: rewritten from memory when Redis answers.
        self.stale = False
        #: What Redis lacks has also left memory: nothing more is written.
        self.lost = False
        #: Loop time until which this process surely holds the lease.
        self.lease_until = 0.0
        self.ended_at: float | None = None

    def append(self, seq: int, data: bytes, last: bool) -> None:
        self.writer.queue(self, seq, data, last)

    async def listened(self) -> bool:
        return await self.writer.store.listened(self.gen.id)

    def leased(self) -> bool:
        """Whether the producer may hand what it reads to its readers without asking Redis."""
        return (self.fence == "0" or not self.writer.store.available
                or self.writer.loop.time() < self.lease_until)

    async def confirm(self) -> bool:
        """After a stall: whether the stream is still this process's (False: it was ended elsewhere)."""
        return await self.writer.confirm(self)


class Writer:
    """The writes of one process: a queue of dirty copies, one round trip at a time."""

    def __init__(self, store: RedisStore, on_fenced: Callable[[Generation], None]) -> None:
        self.store = store
        config = store.config
        self.loop = asyncio.get_running_loop()
        self._on_fenced = on_fenced
        self.owned: dict[str, StreamCopy] = {}
        self._dirty: dict[str, StreamCopy] = {}
        self._queued = 0
        self._limit = config.redis_queue
        self._wake = asyncio.Event()
        self.sending = False
        self.round_trips = 0
        self.events_written = 0
        self._maxlen = str(config.redis_log_events)

    def idle(self) -> bool:
        """Nothing queued, in flight or waiting for a repair."""
        return not self._dirty and not self.sending and not any(c.stale for c in self.owned.values())

    # -- queueing ------------------------------------------------------------------------

    def add(self, gen: Generation) -> StreamCopy:
        copy = StreamCopy(self, gen)
        self.owned[gen.id] = copy
        self._mark(copy)
        return copy

    def _mark(self, copy: StreamCopy) -> None:
        self._dirty[copy.gen.id] = copy
        if not self._wake.is_set():
            self._wake.set()

    def queue(self, copy: StreamCopy, seq: int, data: bytes, last: bool) -> None:
        if last:
            copy.ended_at = self.loop.time()
        if copy.lost or copy.stale:
            if last and copy.lost:
                self.owned.pop(copy.gen.id, None)
            return  # lost: nothing more; stale: the repair sends it from memory
        if self._queued >= self._limit:
            # Redis is not keeping up: this copy is rewritten from memory later rather than
            # memory grown here.
            self._stale(copy, "the queue of writes to Redis is full")
            return
        if not copy.events:
            copy.base = seq
        copy.events.append(data)
        copy.last = last
        self._queued += 1
        self._mark(copy)

    def _stale(self, copy: StreamCopy, why: str) -> None:
        if not copy.stale:
            log.info("stream %s: its copy in Redis fell behind (%s); it is rewritten when Redis answers",
                     copy.gen.id, why)
        copy.stale = True
        self._queued -= len(copy.events)
        copy.events = []
        self._dirty.pop(copy.gen.id, None)

    def restarted(self) -> None:
        """Redis restarted (its data may be gone): every copy held here is written anew."""
        for copy in self.owned.values():
            if not copy.lost:
                copy.fence = "0"
                self._stale(copy, "Redis restarted")

    def prune(self) -> None:
        """Let go of the finished copies no repair needs any more: past ``--stream-ttl`` (Redis has
        let them expire too), or written whole and no longer kept by this process."""
        now = self.loop.time()
        ttl = self.store.config.stream_ttl
        registry = self.store.registry
        for copy in list(self.owned.values()):
            if copy.ended_at is None:
                continue
            if now - copy.ended_at > ttl or (not copy.stale and registry is not None
                                               and registry.get(copy.gen.id) is not copy.gen):
                del self.owned[copy.gen.id]

    def repair(self) -> int:
        """Queue every stale copy again from memory (Redis answers again); the number queued."""
        self.prune()
        count = 0
        for copy in list(self.owned.values()):
            if not copy.stale:
                continue
            copy.stale = False
            base, events = copy.gen.logged()
            copy.base, copy.events = base, events
            copy.last = copy.gen.finished and bool(events)
            self._queued += len(events)
            self._mark(copy)
            count += 1
        return count

    # -- the round trips -----------------------------------------------------------------

    async def run(self) -> None:
        delay = self.store.config.redis_flush_ms / 1000
        while True:
            await self._wake.wait()
            if delay:
                await asyncio.sleep(delay)  # gather more streams' events into this round trip
            self._wake.clear()
            batch = list(self._dirty.values())
            self._dirty.clear()
            self._queued = 0
            if batch:
                self.sending = True
                try:
                    await self._send(batch)
                finally:
                    self.sending = False

    def _stream_args(self, copy: StreamCopy, keys: list[str], args: list[Any]) -> None:
        gen, store = copy.gen, self.store
        keys += (store.key(gen.id, "meta"), store.key(gen.id, "log"), store.key(gen.id, "owner"))
        args += (copy.fence, gen.owner or "", gen.model, gen.kind, copy.base, "1" if copy.last else "0",
                 len(copy.events), *copy.events)

    async def _send(self, batch: list[StreamCopy]) -> None:
        store = self.store
        head = [store.instance, store.owner_ms, store.running_ms, store.kept_ms, self._maxlen]
        sent: list[tuple[StreamCopy, int, bool]] = []
        calls: list[tuple[list[str], list[Any]]] = []
        if store.cluster:
            for copy in batch:  # keys of different slots cannot meet in one script there
                keys: list[str] = []
                args: list[Any] = list(head)
                self._stream_args(copy, keys, args)
                calls.append((keys, args))
        else:
            keys, args = [], list(head)
            for copy in batch:
                self._stream_args(copy, keys, args)
            calls.append((keys, args))
        for copy in batch:
            sent.append((copy, len(copy.events), copy.last))
            copy.events = []
        results: list[Any]
        began = time.perf_counter()
        at = self.loop.time()
        try:
            async with asyncio.timeout(store.write_bound):
                if len(calls) == 1:
                    results = [await store.scripts.call(store.redis, "write", *calls[0], packed=not store.cluster)]
                else:
                    pipe = store.redis.pipeline(transaction=False)
                    for keys, args in calls:
                        store.scripts.queue(pipe, "write", keys, args)
                    if not store.scripts.loaded:
                        await store.scripts.load(store.redis)
                    results = await pipe.execute(raise_on_error=False)
        except store.away as exc:
            store.count("write", None)
            store.lost_redis(exc)
            for copy, _, _ in sent:
                self._stale(copy, "Redis could not be reached")
            await asyncio.sleep(0.1)  # not a busy loop while Redis is away
            return
        except Exception as exc:  # refused as a whole (a script error, NOSCRIPT twice): rewritten later
            results = [exc] * len(calls)
        store.count("write", began)
        self.round_trips += 1
        store.back()
        # Each call answers two numbers per stream it carried (its fence and whether written), or
        # fails for all of them.
        answers: list[tuple[Any, Any]] = []
        for (keys, _), result in zip(calls, results):
            streams = len(keys) // 3
            if isinstance(result, Exception):
                answers += [(result, None)] * streams
            else:
                answers += [(result[2 * i], result[2 * i + 1]) for i in range(streams)]
        for (copy, count, last), (fence, written) in zip(sent, answers):
            self._written(copy, fence, written, count, last, at)

    def _written(self, copy: StreamCopy, result: Any, written: Any, count: int, last: bool, at: float) -> None:
        gen = copy.gen
        if isinstance(result, Exception):
            if self.store.scripts.missing(result):
                self.store.scripts.lost()
            elif not copy.stale:
                log.warning("stream %s: Redis refused a write: %s", gen.id, self.store.reason(result))
            self._stale(copy, "Redis refused a write")
            return
        status = int(result)
        if status == -1:
            self._fenced(copy)
            return
        if status == -2:
            self._gone(copy)
            return
        if copy.fence == "0":
            copy.lease_until = at + self.store.config.owner_ttl  # created here: the lease starts
        copy.fence = str(status)
        self._done(copy)
        self.events_written += count
        if int(written) == -3:
            copy.lost = True
            log.warning("stream %s: its copy in Redis is incomplete (the events it lacks have left memory); "
                        "readers elsewhere are told", gen.id)
        if copy.lost and gen.finished:
            self.owned.pop(gen.id, None)

    def _fenced(self, copy: StreamCopy) -> None:
        """Ended elsewhere as interrupted (our lease lapsed): nothing of ours goes in after that
        end, and our own readers get the same end."""
        copy.lost = True
        self.owned.pop(copy.gen.id, None)
        self._done(copy)
        log.warning("stream %s: ended elsewhere as interrupted while this process was away; its readers "
                    "here get the same end", copy.gen.id)
        self._on_fenced(copy.gen)

    def _gone(self, copy: StreamCopy) -> None:
        """Redis no longer has it (restarted empty): written anew from memory."""
        copy.fence = "0"
        self._stale(copy, "Redis no longer has it")

    @staticmethod
    def _done(copy: StreamCopy) -> None:
        if not copy.written.done():
            copy.written.set_result(None)

    # -- the lease -----------------------------------------------------------------------

    def renewals(self) -> list[StreamCopy]:
        """The copies whose lease the refresher renews this round."""
        self.prune()
        return [c for c in self.owned.values() if c.fence != "0" and not c.stale and not c.gen.finished]

    def renewal(self, copy: StreamCopy) -> tuple[list[str], list[Any]]:
        """The ``RENEW`` script's keys and arguments for one copy's lease."""
        store = self.store
        return ([store.key(copy.gen.id, "meta"), store.key(copy.gen.id, "owner")],
                [store.instance, copy.fence, store.owner_ms])

    def renewed(self, copy: StreamCopy, result: Any, at: float) -> None:
        """The refresher's (or a confirmation's) answer for one lease."""
        if isinstance(result, Exception):
            return
        status = int(result)
        if status == 1:
            copy.lease_until = at + self.store.config.owner_ttl
        elif status == -1 and not copy.lost:
            self._fenced(copy)
        elif status == -2:
            self._gone(copy)

    async def confirm(self, copy: StreamCopy) -> bool:
        store = self.store
        at = self.loop.time()
        try:
            async with asyncio.timeout(store.bound):
                result = await store.scripts.call(store.redis, "renew", *self.renewal(copy))
        except store.away as exc:
            store.lost_redis(exc)
            return True  # nobody can end it elsewhere while Redis is away: go on for our readers
        except store.failed as exc:
            # Refused (an ACL, a read-only replica): no answer either way, so the same as away,
            # as a refused write is (its copy is rewritten once Redis takes writes again).
            log.warning("stream %s: Redis refused to confirm its lease (%s); it goes on for its readers here",
                        copy.gen.id, store.reason(exc))
            return True
        store.back()
        self.renewed(copy, result, at)
        if int(result) == -2:
            store.repair_soon()
        return int(result) != -1
