"""Stream and event ids.

A stream id is 128 random bits: the capability to read or stop the stream.  Event ids are
``<stream id>.<sequence>``: the stream id finds the stream, the sequence the position, so a
reconnect on any route resumes its own stream.  ``<stream id>.end`` marks an event after which a
client has nothing more to get (a reconnect with it gets 204).
"""

from __future__ import annotations

import secrets
from typing import Final

END_MARK: Final = "end"


def new_stream_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits, URL- and header-safe, no "."


def event_id(stream_id: str, seq: int | None) -> str:
    return f"{stream_id}.{END_MARK if seq is None else seq}"


def parse_event_id(value: str) -> tuple[str, int | None] | None:
    """``"<id>.<n>"`` → ``(id, n)``; ``"<id>.end"`` → ``(id, None)``; anything else → None."""
    stream_id, dot, pos = value.strip().rpartition(".")
    if not dot or not stream_id or len(stream_id) > 64:
        return None
    if pos == END_MARK:
        return stream_id, None
    if not is_ascii_digits(pos) or len(pos) > 12:
        return None
    return stream_id, int(pos)


def is_ascii_digits(text: str) -> bool:
    """0-9 only: ``str.isdigit`` also accepts "³" and "٣", which ``int()`` reads or rejects."""
    return text.isascii() and text.isdigit()
