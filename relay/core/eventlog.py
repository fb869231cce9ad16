"""A generation's event log: its encoded events in order, bounded in bytes, read from a position.

Every reader of a generation (its HTTP responses, a reconnect) reads here from its own
position.  The log keeps ``keep`` bytes for reconnects; past that it drops its oldest events,
but never what a reader still needs (the ``floor`` its generation names) unless the log has
grown past four times the replay log (``cap``): a burst larger than the log must not cost a live
reader its events, and a reader lagging by more than that loses them (its next read is
``ResumeExpired``), so memory stays bounded even before its send timeout aborts it.
"""

from __future__ import annotations


class ResumeExpired(Exception):
    """The position asked for has already left the bounded log."""


class EventLog:
    # Thousands are alive at once: slots keep each one small.
    __slots__ = ("_events", "_replay", "base", "keep", "nbytes", "next_seq")

    def __init__(self, keep: int, replay_bytes: int) -> None:
        #: The bytes it keeps for reconnects (0: only what its readers have yet to read).
        self.keep = keep
        # (The replay log's size, shared by every log: the cap is worked out when it is needed,
        # not kept as one more int per generation.)
        self._replay = replay_bytes
        self._events: list[bytes] = []
        #: The sequence number of the first event still here.
        self.base = 0
        #: The bytes of the events still here.
        self.nbytes = 0
        #: The sequence number the next event gets.
        self.next_seq = 0

    def append(self, data: bytes) -> int:
        """Add an event; its sequence number."""
        self._events.append(data)
        self.nbytes += len(data)
        seq = self.next_seq
        self.next_seq = seq + 1
        return seq

    def since(self, pos: int) -> bytes:
        """Every event from ``pos`` (which must still be here) on, joined."""
        start = pos - self.base
        events = self._events
        if start == len(events) - 1:
            return events[start]
        return b"".join(events[start:])

    def read(self, pos: int) -> bytes:
        """What a reader at ``pos`` has not read yet (b"" when nothing); ResumeExpired when gone."""
        if pos < self.base:
            raise ResumeExpired
        if pos >= self.next_seq:
            return b""
        return self.since(pos)

    def holds(self, pos: int) -> bool:
        """Whether ``pos`` is an event still here."""
        return self.base <= pos < self.next_seq

    def snapshot(self) -> tuple[int, list[bytes]]:
        """The sequence number of the first event still here, and the events from there."""
        return self.base, list(self._events)

    def bound(self, floor: int) -> None:
        """Back within its bound, keeping every event from ``floor`` on unless past the cap."""
        if self.nbytes <= self.keep:
            return
        # Down to three quarters, so eviction is amortised; never the last event.
        target = self.keep * 3 // 4
        hard = self.nbytes > 4 * self._replay
        events = self._events
        drop = 0
        nbytes = self.nbytes
        while drop < len(events) - 1 and nbytes > target and (hard or self.base + drop < floor):
            nbytes -= len(events[drop])
            drop += 1
        if drop:
            del events[:drop]
            self.base += drop
            self.nbytes = nbytes
