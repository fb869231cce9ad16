"""One keepalive schedule per event loop for every open event stream, instead of a task each.

aiohttp-sse gives each response a ping task that sleeps between pings: a task, a coroutine
frame, a future and a timer per open stream (1.9 KiB each, measured), woken on its own.  Here
every stream has one entry in a heap ordered by when its keepalive could next be due, and one
timer serves the heap's head.  A stream's writes do not touch the heap: they only stamp the
time of the last write, and when an entry comes due the stream says when it is really due (a
later write moved it) or writes its keepalive.  So each open stream costs one heap operation
per keepalive interval, whatever its event rate.

Entries are never early: a keepalive is written only after the full interval of silence, and
at most ``COALESCE`` late, so that streams due together are served by one timer callback.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from typing import Final, Protocol

log = logging.getLogger("relay.keepalive")

#: Entries due within this many seconds of each other are served by one timer callback.
COALESCE: Final = 0.01


class Pinged(Protocol):
    def keepalive_due(self, now: float) -> float | None:
        """Write the keepalive if it is due at ``now``; the time it is next due, or None: done."""


class Entry:
    """One stream's place in the schedule; ``cancel`` takes it out (lazily: it is skipped)."""

    __slots__ = ("due", "seq", "stream")

    def __init__(self, due: float, seq: int, stream: Pinged) -> None:
        self.due, self.seq = due, seq
        self.stream: Pinged | None = stream

    def __lt__(self, other: Entry) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        # Dropped now, so a finished response is not held until its entry's turn comes.
        self.stream = None


class Keepalives:
    """The schedule of one event loop (``Keepalives.of(loop)``)."""

    _by_loop: dict[asyncio.AbstractEventLoop, Keepalives] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Keepalives:
        schedule = cls._by_loop.get(loop)
        if schedule is None:
            # Kept only while it has entries (see _fire), so a closed loop is not held.
            schedule = cls._by_loop[loop] = cls(loop)
        return schedule

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones included until their turn."""
        return len(self._heap)

    def add(self, stream: Pinged, due: float) -> Entry:
        entry = Entry(due, next(self._seq), stream)
        heapq.heappush(self._heap, entry)
        self._arm()
        return entry

    def _arm(self, earliest: float = 0.0) -> None:
        """The timer at the head's time (not before ``earliest``), unless it is set sooner already."""
        if not self._heap:
            return
        at = max(self._heap[0].due, earliest)
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0].due <= now:
            entry = heap[0]
            stream = entry.stream
            try:
                due = None if stream is None else stream.keepalive_due(now)
            except Exception:  # one stream's fault must not stop every stream's keepalives
                log.exception("keepalive: a stream failed; it gets no more keepalives")
                due = None
            if due is None:
                heapq.heappop(heap)
                entry.stream = None
            else:
                # Back in at its new time, the same entry (the stream's handle stays valid).
                entry.due = max(due, now + COALESCE)
                entry.seq = next(self._seq)
                heapq.heapreplace(heap, entry)
        if heap:
            self._arm(now + COALESCE)
        elif self._by_loop.get(self._loop) is self:
            del self._by_loop[self._loop]
