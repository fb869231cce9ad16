"""Server-Sent Events codec.

Implements the WHATWG HTML Standard's "parse an event stream" and
"interpret an event stream" algorithms (section 9.2, Server-sent events)
as an incremental decoder, plus the matching encoder.  Pure: no I/O and
no asyncio, so the same code serves the upstream reader and the tests.

Decoding follows the spec completely: UTF-8 with replacement, one leading
BOM stripped, CR / LF / CRLF line endings (including a CRLF split across
two feeds), comments, the one-space rule after the colon, NUL-bearing ids
ignored, digits-only ``retry``, and a blank line dispatching the event.
An unterminated final event is never dispatched.

The spec sets no line-length limit; ``max_event_size`` is ours.  It counts
UTF-8 bytes of the *decoded* text: the data buffer (each value plus its
line break) plus the line currently being read, field name included and
line terminator excluded.  The check is made per line, so whether a
stream is rejected never depends on how it was chunked.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["Event", "EventTooLarge", "SSEDecoder", "comment", "encode"]

# Only these three are SSE line terminators; str.splitlines() would also
# split on U+2028, U+0085, \v, \f ... and corrupt data.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str = ""  # the last event ID in force at dispatch (persisting, per spec)
    #: The value of an ``error:`` field line, only with ``SSEDecoder(error_field=True)``.
    error: str | None = None


class EventTooLarge(ValueError):
    """An event (or a line) grew past ``max_event_size``.

    ``events`` holds the events completed earlier in the same ``feed()``
    call, so a caller can still forward them: otherwise what got delivered
    before the failure would depend on how the bytes were chunked.
    """

    events: tuple[Event, ...] = ()


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython, so the common JSON payload costs no copy.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class SSEDecoder:
    """Incremental event-stream decoder: ``feed()`` bytes, get Events back.

    After ``EventTooLarge`` the decoder is poisoned (every later ``feed``
    raises again): the stream position is mid-event and cannot be trusted.
    """

    def __init__(self, *, max_event_size: int | None = None, error_field: bool = False) -> None:
        if max_event_size is not None and max_event_size < 1:
            raise ValueError(f"max_event_size must be a positive integer, got {max_event_size!r}")
        self.retry: int | None = None
        self.last_event_id: str = ""
        self._max = max_event_size
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True  # BOM not yet ruled out
        self._skip_lf = False  # previous text ended in CR; a leading LF completes CRLF
        self._pending: list[str] = []  # partial line, kept in pieces to avoid O(n^2) joins
        self._pending_size = 0
        self._data: list[str] = []  # joined with "\n" at dispatch == spec's append + strip
        self._data_size = 0
        self._event_type = ""
        self._failed: str | None = None
        # Off by default (the spec ignores unknown fields).  The upstream reader turns it on:
        # llama.cpp's server through 2025 reported a failure mid-stream as an ``error:`` line,
        # which a spec decoder drops, leaving an empty answer that looks finished.
        self._error_field = error_field
        self._error: list[str] = []

    def feed(self, data: bytes) -> list[Event]:
        if self._failed is not None:
            raise EventTooLarge(self._failed)
        text = self._decoder.decode(data)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []

        has_cr = "\r" in text
        if not has_cr and "\n" not in text:
            self._pending.append(text)
            if self._max is not None:
                self._pending_size += _utf8_len(text)
                self._check(self._pending_size, [])
            return []

        if self._pending:
            self._pending.append(text)
            text = "".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
        if has_cr:
            # A trailing CR may be the first half of a CRLF split across feeds.
            self._skip_lf = text[-1] == "\r"
            lines = _LINE_END.split(text)
        else:
            lines = text.split("\n")
        tail = lines.pop()

        events: list[Event] = []
        limit = self._max
        for line in lines:
            if limit is not None:
                self._check(_utf8_len(line), events)
            if not line:
                if self._data:
                    events.append(
                        Event("\n".join(self._data), self._event_type or "message", self.last_event_id,
                              "\n".join(self._error) if self._error else None)
                    )
                    self._data = []
                    self._data_size = 0
                    self._error = []
                elif self._error:
                    events.append(Event("", self._event_type or "message", self.last_event_id,
                                        "\n".join(self._error)))
                    self._error = []
                    self._data_size = 0
                self._event_type = ""
                continue
            if line.startswith("data: "):  # the hot path: skip the generic split
                name, value = "data", line[6:]
            elif line[0] == ":":
                continue
            else:
                name, _, value = line.partition(":")
                if value and value[0] == " ":
                    value = value[1:]
            if name == "data":
                self._data.append(value)
                if limit is not None:
                    self._data_size += _utf8_len(value) + 1
            elif name == "event":
                self._event_type = value
            elif name == "id":
                if "\0" not in value:
                    self.last_event_id = value
            elif name == "error" and self._error_field:
                self._error.append(value)
                if limit is not None:
                    self._data_size += _utf8_len(value) + 1
            elif name == "retry":
                # isdigit() alone accepts "³" and other non-ASCII digits.
                if value.isascii() and value.isdigit():
                    self.retry = int(value)

        if tail:
            self._pending.append(tail)
            if limit is not None:
                self._pending_size = _utf8_len(tail)
                self._check(self._pending_size, events)
        return events

    def close(self) -> None:
        """End of stream: an unterminated last event is dropped, per spec."""
        self._decoder.reset()
        self._pending.clear()
        self._pending_size = 0
        self._data = []
        self._data_size = 0
        self._event_type = ""
        self._error = []
        self._skip_lf = False

    def _check(self, line_size: int, events: list[Event]) -> None:
        # Data buffered so far plus the line in hand: both partial and
        # complete lines go through here, so chunking cannot change the verdict.
        assert self._max is not None
        if self._data_size + line_size > self._max:
            self._failed = f"event exceeds the {self._max}-byte limit"
            self.close()
            err = EventTooLarge(self._failed)
            err.events = tuple(events)
            raise err


def encode(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Frame one event.  CR and CRLF inside ``data`` come back as LF."""
    if event is None and retry is None and "\n" not in data and "\r" not in data:
        # The hot path: one line of JSON (line breaks inside JSON strings are escaped).
        if id is None:
            return f"data: {data}\n\n".encode("utf-8")
        if "\r" not in id and "\n" not in id and "\0" not in id:
            return f"id: {id}\ndata: {data}\n\n".encode("utf-8")
    parts: list[str] = []
    if id is not None:
        if "\r" in id or "\n" in id or "\0" in id:
            raise ValueError(f"SSE id must not contain CR, LF or NUL: {id!r}")
        parts.append(f"id: {id}\n")
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError(f"SSE event type must not contain CR or LF: {event!r}")
        parts.append(f"event: {event}\n")
    # Always at least one data line: "data: \n" is what makes data="" an event.
    for line in _LINE_END.split(data):
        parts.append(f"data: {line}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError(f"SSE retry must be a non-negative integer, got {retry!r}")
        parts.append(f"retry: {retry}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def comment(text: str = "") -> bytes:
    """One comment line and no blank line: a keepalive that never dispatches."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"SSE comment must be a single line: {text!r}")
    return b":" + text.encode("utf-8") + b"\n"
