"""The keepalive schedule (relay/http/keepalive.py): one per loop instead of a ping task per
stream; never early, a stream's writes push it back, a finished stream leaves it, and the
schedule itself goes once it is empty.  Also pins the TCP_USER_TIMEOUT EventStream.prepare sets
on the client socket (and restores when the stream ends).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any

from conftest import FakeUpstream, SSEClient, paused, wait_for
from relay.http.appkeys import CONFIG
from relay.http.keepalive import Keepalives


class Stream:
    """A stand-in for an EventStream: silent since ``last``; records when it was pinged."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, stop_after: int = 1_000) -> None:
        self.loop, self.interval, self.stop_after = loop, interval, stop_after
        self.last = loop.time()
        self.pinged: list[float] = []
        self.done = asyncio.Event()

    def keepalive_due(self, now: float) -> float | None:
        if len(self.pinged) >= self.stop_after:
            self.done.set()
            return None
        due = self.last + self.interval
        if due > now:
            return due
        self.pinged.append(now)
        self.last = now
        return now + self.interval


async def test_keepalives_come_only_after_the_full_silence_and_writes_push_them_back() -> None:
    loop = asyncio.get_running_loop()
    schedule = Keepalives.of(loop)
    quiet = Stream(loop, 0.05, stop_after=3)
    busy = Stream(loop, 0.05, stop_after=1)
    started = loop.time()
    schedule.add(quiet, started + 0.05)
    schedule.add(busy, started + 0.05)
    # ``busy`` is written to (its last write moves) until ``quiet`` has had two keepalives.
    while len(quiet.pinged) < 2:
        busy.last = loop.time()
        await asyncio.sleep(0.01)
    assert busy.pinged == []  # each time its entry came due, a write had pushed it back
    await asyncio.wait_for(quiet.done.wait(), 10)
    await asyncio.wait_for(busy.done.wait(), 10)
    # Never early: each keepalive a full interval after the stream's previous write or keepalive.
    marks = [started, *quiet.pinged]
    assert all(b - a >= 0.05 for a, b in zip(marks, marks[1:])), marks
    # Both returned None: out of the heap, and the empty schedule no longer held for its loop.
    assert len(schedule) == 0 and loop not in Keepalives._by_loop


async def test_a_cancelled_entry_is_skipped_and_drops_its_stream_at_once() -> None:
    loop = asyncio.get_running_loop()
    schedule = Keepalives.of(loop)
    gone = Stream(loop, 0.02)
    kept = Stream(loop, 0.02, stop_after=2)
    entry = schedule.add(gone, loop.time() + 0.02)
    schedule.add(kept, loop.time() + 0.02)
    entry.cancel()
    assert entry.stream is None  # the finished response is not held until the entry's turn
    await asyncio.wait_for(kept.done.wait(), 10)
    assert gone.pinged == [] and len(kept.pinged) == 2
    assert loop not in Keepalives._by_loop


async def test_an_open_stream_costs_no_task_of_its_own_for_keepalives(make_relay: Any,
                                                                      upstream: FakeUpstream) -> None:
    """20 streams open and silent, each past its keepalive interval: none has a ping task (the
    tasks are aiohttp's connection and request tasks and the generation's)."""
    upstream.behaviour = paused("", "end")
    relay = await make_relay(keepalive=0.05)
    warm = SSEClient(await relay.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]}))
    upstream.release.set()
    await warm.all()
    upstream.release.clear()
    base = len(asyncio.all_tasks())
    clients = []
    for _ in range(20):
        resp = await relay.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        clients.append(SSEClient(resp))
    for c in clients:
        await c.next()  # its start event: the stream is open
    await wait_for(lambda: upstream.chunks_sent == 3 + 20, what="every upstream answer begun")
    # A keepalive interval passed for every stream: each got its keepalive without a task.
    for c in clients:
        while c.raw.count(b":keepalive\n") < 1:
            data = await c.resp.content.readany()
            assert data
            c.raw += data
    names = collections.Counter(getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks())
    assert not [name for name in names if "ping" in name.lower()], names
    # Per stream: the relay's connection and request tasks and its generation; the fake upstream's
    # connection and request tasks (pooled connections reused, so at most five each).
    assert names["Generation._produce"] == 20
    assert len(asyncio.all_tasks()) - base <= 5 * 20, names
    # The user timeout EventStream sets (the kernel gives up on a peer that acknowledges nothing).
    server = relay.server.runner.server
    timeouts = [h.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                for h in server.connections if h.transport is not None]
    assert timeouts.count(int(relay.app[CONFIG].send_timeout * 1000)) == 20, timeouts
    upstream.release.set()
    for c in clients:
        await c.all()
