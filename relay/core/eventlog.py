"""A generation's event log: its encoded events in order, bounded in bytes, read from a position.

Every reader of a generation (its HTTP responses, a reconnect) reads here from its own
position; the generation decides what may be dropped (``trim``: never what an attached reader
has yet to read, unless it lags past the hard bound) and the log only keeps the accounts.
"""

from __future__ import annotations


class ResumeExpired(Exception):
    """The position asked for has already left the bounded log."""


class EventLog:
    # Thousands are alive at once: slots keep each one small.
    __slots__ = ("_events", "base", "nbytes", "next_seq")

    def __init__(self) -> None:
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

    def trim(self, target: int, floor: int, hard: bool) -> None:
        """Drop the oldest events down to ``target`` bytes, but none at or after ``floor`` unless
        ``hard``, and never the last one."""
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
