"""Readers elsewhere: one blocking ``XREAD`` per process follows every stream served from Redis.

A reader of a stream this process does not produce (a resume that landed on another instance)
joins here, reads what it missed with one ``XRANGE``, and is then handed what the one
multiplexed ``XREAD BLOCK`` brings for its stream.  The same loop does, once per stream and not
once per reader, what following needs besides: it refreshes the stream's presence key (a
listener here keeps the producer going) and, when the stream has been quiet, asks whether its
producer is still there.  Redis connections and commands so stay a handful per process,
whatever the number of readers.

A stream joining the read must not wait out a block already in flight: the joiner asks Redis to
end that block (``CLIENT UNBLOCK`` on the reading connection's id) until a read that includes
the new stream has started.

When Redis stops answering, every reader here is told within the block time plus
``--redis-timeout`` (``StoreUnavailable``), never left waiting: its client gets a retriable error
event and its reconnect lands on whatever state the stream is in by then.

The producer gone: a stream whose owner key has stayed gone for a whole ``--owner-ttl`` (as
this loop sees it) is ended with the ``interrupted`` event, atomically and once
(relay/core/redis_scripts.py).  Waiting a whole TTL, not ending it at the first miss, is what
lets a producer that was only cut off from a stalled Redis renew its lease when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from relay.core.store import StoreUnavailable

if TYPE_CHECKING:
    from relay.core.redis_store import RedisStore

log = logging.getLogger("relay.redis")

Entry = tuple[bytes, dict[bytes, bytes]]


class Tail:
    """One reader's inbox: entries pushed by the read, what is known of the end, and a wake-up."""

    __slots__ = ("entries", "error", "followed", "gone", "wake")

    def __init__(self, followed: Followed) -> None:
        self.followed = followed
        self.entries: list[Entry] = []
        self.error: StoreUnavailable | None = None
        #: The stream expired from Redis while it was followed: nothing more will come.
        self.gone = False
        self.wake = asyncio.Event()

    @property
    def end(self) -> int | None:
        return self.followed.end

    def take(self) -> list[Entry]:
        entries, self.entries = self.entries, []
        self.wake.clear()
        if not entries and self.error is not None:
            raise self.error
        return entries


class Followed:
    """One stream followed here: where the read is, its readers, and what the checks found."""

    __slots__ = ("absent_since", "checked_at", "end", "interrupted", "keys", "last", "quiet_since", "tails", "task")

    def __init__(self, keys: list[str], after: bytes | str, interrupted: bytes, end: int | None, now: float) -> None:
        self.keys = keys  # meta, log, owner, seen
        self.last = after
        self.interrupted = interrupted
        self.end = end
        self.tails: set[Tail] = set()
        self.quiet_since = now
        self.absent_since: float | None = None
        self.checked_at = 0.0
        #: Its own read (Redis Cluster only).
        self.task: asyncio.Task[None] | None = None


class Followers:
    """The process's one blocking read over every stream its readers follow."""

    def __init__(self, store: RedisStore, client: Any, *, per_stream: bool = False) -> None:
        self.store = store
        self.client = client  # a single-connection client of its own: its id is what UNBLOCK names
        #: Redis Cluster: an XREAD cannot span hash slots, so each followed stream has a read of its
        #: own (still one per stream, not one per reader).
        self.per_stream = per_stream
        config = store.config
        #: The longest a read blocks, and so the period of the presence and producer checks.
        self.period = config.presence_ttl / 3
        self._followed: dict[str, Followed] = {}  # by log key
        self._some = asyncio.Event()
        self._version = 0  # bumped by every new stream
        self._reading = -1  # the version the read in flight covers
        self._client_id: int | None = None
        self._checked_at = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def streams(self) -> int:
        return len(self._followed)

    def start(self) -> None:
        if not self.per_stream:
            self._task = asyncio.create_task(self._run(), name="redis-followers")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *(f.task for f in self._followed.values())) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def join(self, keys: list[str], after: bytes | str, interrupted: bytes, end: int | None) -> Tail:
        """Follow the stream whose keys are ``keys`` (meta, log, owner, seen) from after ``after``."""
        followed = self._followed.get(keys[1])
        if followed is None:
            followed = self._followed[keys[1]] = Followed(keys, after, interrupted, end,
                                                          asyncio.get_running_loop().time())
            if self.per_stream:
                followed.task = asyncio.create_task(self._run_one(followed), name="redis-follow")
                self.store.keep(followed.task)
                return self._tail(followed)
            self._version += 1
            self._some.set()
            if self._reading >= 0:
                self.store.keep(asyncio.get_running_loop().create_task(self._nudge(self._version)))
        return self._tail(followed)

    @staticmethod
    def _tail(followed: Followed) -> Tail:
        tail = Tail(followed)
        followed.tails.add(tail)
        return tail

    def leave(self, tail: Tail) -> None:
        followed = tail.followed
        followed.tails.discard(tail)
        if not followed.tails and self._followed.get(followed.keys[1]) is followed:
            del self._followed[followed.keys[1]]
            if followed.task is not None:
                followed.task.cancel()

    async def _run_one(self, followed: Followed) -> None:
        """Redis Cluster: one stream's own blocking read, with its checks."""
        store = self.store
        loop = asyncio.get_running_loop()
        key = followed.keys[1]
        while self._followed.get(key) is followed:
            try:
                async with asyncio.timeout(self.period + store.bound):
                    answer = await self.client.xread({key: followed.last}, count=1000,
                                                     block=max(1, int(self.period * 1000)))
                now = loop.time()
                self._deliver(answer, now)
                if now - followed.checked_at >= self.period:
                    followed.checked_at = now
                    async with asyncio.timeout(store.bound):
                        await self._check([followed], now)
            except store.away as exc:
                store.lost_redis(exc)
                self._fail(StoreUnavailable(f"the shared store (Redis) stopped answering: {store.reason(exc)}"),
                           [followed])
                return
            except Exception as exc:
                log.error("Redis: a follower's read failed", exc_info=exc)
                self._fail(StoreUnavailable("the shared store (Redis) read failed"), [followed])
                return
            store.back()

    async def _nudge(self, version: int) -> None:
        """End the block in flight until a read that includes the new stream has started."""
        store = self.store
        for _ in range(50):
            if self._reading >= version or self._reading < 0 or self._client_id is None:
                return
            try:
                async with asyncio.timeout(store.bound):
                    await store.redis.client_unblock(self._client_id)
            except store.away:
                return  # the read itself will find Redis gone
            await asyncio.sleep(0.002)

    async def _run(self) -> None:
        store = self.store
        loop = asyncio.get_running_loop()
        while True:
            if not self._followed:
                self._some.clear()
                self._reading = -1
                await self._some.wait()
            try:
                async with asyncio.timeout(self.period + store.bound):
                    if self._client_id is None:
                        self._client_id = int(await self.client.client_id())
                    version = self._version
                    positions = {key: f.last for key, f in self._followed.items()}
                    if not positions:
                        continue  # every reader left meanwhile
                    self._reading = version
                    answer = await self.client.xread(positions, count=1000, block=max(1, int(self.period * 1000)))
                now = loop.time()
                self._deliver(answer, now)
                if now - self._checked_at >= self.period:
                    self._checked_at = now
                    async with asyncio.timeout(store.bound):
                        await self._check(list(self._followed.values()), now)
            except store.away as exc:
                self._client_id = None
                self._reading = -1
                store.lost_redis(exc)
                self._fail(StoreUnavailable(f"the shared store (Redis) stopped answering: {store.reason(exc)}"))
                await asyncio.sleep(0.05)
                continue
            except Exception as exc:  # a bug of ours or an answer we did not expect: every reader is told
                log.error("Redis: the followers' read failed", exc_info=exc)
                self._fail(StoreUnavailable("the shared store (Redis) read failed"))
                await asyncio.sleep(0.5)
                continue
            store.back()

    def _deliver(self, reply: Any, now: float) -> None:
        for key, entries in reply or ():
            followed = self._followed.get(key.decode() if isinstance(key, bytes) else key)
            if followed is None or not entries:
                continue
            followed.last = entries[-1][0]
            followed.quiet_since = now
            followed.absent_since = None
            for tail in followed.tails:
                tail.entries.extend(entries)
                tail.wake.set()

    async def _check(self, followed: list[Followed], now: float) -> None:
        """Followed streams' presence, and for the quiet ones whether their producer is there."""
        store = self.store
        pipe = store.redis.pipeline(transaction=False)
        asked = []
        for f in followed:
            pipe.set(f.keys[3], b"1", px=store.presence_ms)
            if f.end is None and now - f.quiet_since >= self.period:
                commit = f.absent_since is not None and now - f.absent_since >= store.config.owner_ttl
                store.scripts.queue(pipe, "interrupt", f.keys[:3], [f.interrupted, store.kept_ms, "1" if commit else "0"])
                asked.append(f)
        if not store.scripts.loaded:
            await store.scripts.load(store.redis)
        results = iter(await pipe.execute(raise_on_error=False))
        quiet = {id(f) for f in asked}
        for f in followed:
            next(results)  # its presence
            if id(f) in quiet:
                self._checked(f, next(results), now)

    def _checked(self, f: Followed, ended: Any, now: float) -> None:
        store = self.store
        if isinstance(ended, Exception):
            if store.scripts.missing(ended):
                store.scripts.lost()
            return
        if ended is None:
            f.absent_since = None  # the producer is there
        elif int(ended) == -2:
            f.absent_since = f.absent_since if f.absent_since is not None else now
        elif int(ended) == -1:
            for tail in f.tails:  # expired from Redis meanwhile: nothing more will come
                tail.gone = True
                tail.wake.set()
        else:
            f.end = int(ended)  # its terminal event comes with the next read
            for tail in f.tails:
                tail.wake.set()

    def _fail(self, error: StoreUnavailable, which: list[Followed] | None = None) -> None:
        for followed in list(self._followed.values()) if which is None else which:
            for tail in followed.tails:
                tail.error = error
                tail.wake.set()
            if self._followed.get(followed.keys[1]) is followed:
                del self._followed[followed.keys[1]]
