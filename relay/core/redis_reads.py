"""What a resume asks of the Redis store: whether a stream is there, its events, following it as
it grows, whether a reader elsewhere follows it, and a cancel for whichever instance produces it.

Every step is bounded (``RedisStore.ask``); a Redis away or refusing is a retriable
``StoreUnavailable``, never a ``404`` (which would end an ``EventSource`` for good).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from relay.core.eventlog import ResumeExpired
from relay.core.store import Remote, StoreUnavailable

if TYPE_CHECKING:
    from relay.core.redis_store import RedisStore


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def _after(pos: int) -> str:
    """The XREAD position whose next entry is ``pos``."""
    return f"{pos - 1}-1" if pos > 0 else "0-0"


class Reads:
    def __init__(self, store: RedisStore, miss_wait: float) -> None:
        self.store = store
        #: How long a lookup that misses waits before it looks again.
        self._miss_wait = miss_wait

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the shared store (Redis) failed: {self.store.reason(exc)}")

    async def listened(self, stream_id: str) -> bool:
        store = self.store
        try:
            return bool(await store.ask(store.redis.exists(store.key(stream_id, "seen"))))
        except store.soft:
            return False

    async def lookup(self, stream_id: str) -> Remote | None:
        store = self.store
        key = store.key(stream_id, "meta")
        try:
            meta = await store.ask(store.redis.hgetall(key))
            if not meta:
                # A stream announced a moment ago elsewhere may not be here yet: its producer's
                # writer sends it after --redis-flush-ms and a round trip, while the client has
                # its id (the start event) at once.  A 404 would end an EventSource for good.
                await asyncio.sleep(self._miss_wait)
                meta, server = await store.ask(self._meta_and_run_id(key))
                if not meta and (str(server.get("run_id", "")).encode() != store.run_id
                                 or asyncio.get_running_loop().time() < store.unsure_until):
                    # Redis restarted (or came back) moments ago: the producers may not have
                    # written their streams again yet.  Retriable, unlike the 404.
                    raise StoreUnavailable("the shared store (Redis) restarted moments ago and its streams are "
                                           "being written again")
        except store.failed as exc:
            raise self._failed(exc) from None
        if not meta:
            return None
        owner = meta.get(b"owner", b"").decode() or None
        end = meta.get(b"end")
        return Remote(stream_id, owner, int(end) if end is not None else None, unreplayable=b"lost" in meta,
                      interrupted=b"interrupted" in meta, kind=meta.get(b"kind", b"chat").decode())

    async def _meta_and_run_id(self, key: str) -> tuple[dict[bytes, bytes], dict[str, Any]]:
        store = self.store
        if store.cluster:
            # (A keyless INFO has no place in a cluster pipeline; a failover there keeps the data.)
            return await store.redis.hgetall(key), {"run_id": (store.run_id or b"").decode()}
        pipe = store.redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.info("server")
        meta, server = await pipe.execute()
        return meta, server

    async def events(self, remote: Remote) -> list[bytes]:
        store = self.store
        try:
            entries = await store.ask(store.redis.xrange(store.key(remote.id, "log"), "-", "+"))
        except store.failed as exc:
            raise self._failed(exc) from None
        return [fields[b"d"] for _, fields in entries]

    async def follow(self, remote: Remote, pos: int, interrupted: bytes) -> AsyncIterator[bytes]:
        store = self.store
        store.remote_reads += 1
        logkey = store.key(remote.id, "log")
        keys = [store.key(remote.id, "meta"), logkey, store.key(remote.id, "owner"), store.key(remote.id, "seen")]
        # Joined before the catch-up read, so nothing appended in between is missed (what both
        # bring is told apart by seq).  The followers' loop keeps the presence key from here on.
        tail = store.followers.join(keys, _after(pos), interrupted, remote.end)
        try:
            async def start() -> list[Any]:
                pipe = store.redis.pipeline(transaction=False)
                pipe.set(keys[3], b"1", px=store.presence_ms)
                pipe.xrange(logkey, "-", "+", count=1)
                pipe.xrange(logkey, f"{pos}-1" if pos > 0 else "-", "+")
                result: list[Any] = await pipe.execute()
                return result

            _, first, entries = await store.ask(start())
            end = remote.end
            if first and _seq_of(first[0][0]) > pos and (end is None or pos <= end):
                raise ResumeExpired
            while True:
                out = []
                for entry_id, fields in entries:
                    seq = _seq_of(entry_id)
                    if seq < pos:
                        continue
                    out.append(fields[b"d"])
                    pos = seq + 1
                    if b"e" in fields:
                        yield b"".join(out)
                        return
                if out:
                    yield b"".join(out)
                end = tail.end
                if end is not None and pos > end:
                    # The client is past what reached Redis (it read the producer's memory before
                    # it died): the terminal event is all there is for it.
                    entry = await store.ask(store.redis.xrange(logkey, f"{end}-1", f"{end}-1"))
                    if entry:
                        yield entry[0][1][b"d"]
                    return
                if tail.gone:
                    return
                await tail.wake.wait()
                entries = tail.take()
        except store.failed as exc:
            raise self._failed(exc) from None
        finally:
            store.followers.leave(tail)

    async def cancel(self, stream_id: str) -> None:
        store = self.store
        try:
            await store.ask(store.redis.publish(f"{store.prefix}:cancel", stream_id))
        except store.failed as exc:
            raise self._failed(exc) from None
