"""A generation's readers: each at its own position in the event log, handed each batch.

While a reader's handler waits, the producer hands each new batch straight to its ``sink``
(the client's bytes go out in the producer's own step, no task switch); a refusal (the client's
buffer is full: it counts as *blocked* from that step), the end, or a reader with no sink is
woken instead, and its handler reads from its position.  A client gone (its sink raises
``ConnectionError``) is reported back, so the generation can let it go in the same step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from relay.core.eventlog import EventLog


class Subscriber:
    """One connected client: the sequence number of the next event it needs, and how to wake it.

    ``sink``, when given, takes bytes synchronously if it can without waiting (True), refuses
    (False), or raises ``ConnectionError`` when the client has gone.
    """

    __slots__ = ("blocked", "pos", "sink", "waiter")

    def __init__(self, pos: int, sink: Callable[[bytes], bool] | None = None) -> None:
        self.pos = pos
        self.sink = sink
        self.waiter: asyncio.Future[None] | None = None
        #: Its client's send buffer is full: its handler waits for the client to drain it.
        self.blocked = False


class Fanout:
    __slots__ = ("_loop", "_subs")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subs: set[Subscriber] = set()

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(self._subs)

    def __contains__(self, sub: object) -> bool:
        return sub in self._subs

    def add(self, sub: Subscriber) -> None:
        self._subs.add(sub)

    def discard(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    def floor(self, default: int) -> int:
        """The oldest position a reader still needs (``default`` with none attached)."""
        return min((sub.pos for sub in self._subs), default=default)

    def all_blocked(self) -> bool:
        """Every attached reader's client is full (False with none attached)."""
        subs = self._subs
        if not subs:
            return False
        for sub in subs:
            if not sub.blocked:
                return False
        return True

    def publish(self, log: EventLog, finished: bool) -> list[Subscriber] | None:
        """Hand the new batch to every waiting reader (its sink, or a wake-up); the readers whose
        client has gone, if any."""
        gone = None
        for sub in self._subs:
            waiter = sub.waiter
            if waiter is None:
                continue
            if sub.sink is not None and not finished and log.holds(sub.pos):
                try:
                    if sub.sink(log.since(sub.pos)):
                        sub.pos = log.next_seq
                        continue
                    # Refused: its client is not keeping up.  It counts as blocked from now, not
                    # from when its handler next runs, or the producer reads on meanwhile.
                    sub.blocked = True
                except ConnectionError:
                    gone = [*(gone or ()), sub]
            sub.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return gone

    async def changed(self, sub: Subscriber) -> None:
        """Wait for the next batch (unless the sink took it), the upstream's answer, or the end."""
        waiter = sub.waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            if sub.waiter is waiter:
                sub.waiter = None
