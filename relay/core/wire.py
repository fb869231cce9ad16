"""What the core asks of a view: the bytes of each event (``Wire``), and how an answer ended (``Ending``).

The core never looks inside an event: ``/chat``'s typed events (relay/http/chat_wire.py), the
pass-through chunks of ``/v1/chat/completions`` (relay/http/openai_wire.py) and the Responses
API's events (relay/http/responses_wire.py) are each one ``Wire``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from relay.upstream.chunks import Chunk
from relay.upstream.errors import UpstreamError


@dataclass(frozen=True, slots=True)
class Ending:
    """How a generation ended: ``code`` is ``done`` or one of the ``/chat`` error codes."""

    code: str
    message: str = ""
    retriable: bool = False
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    #: The upstream's failure, when it was one (its status, body and headers, for the views).
    error: UpstreamError | None = None
    #: The upstream's own terminal error event went out as it sent it: the view adds no end of its own.
    relayed: bool = False


class Wire(Protocol):
    """One view's wire format: the bytes of each event, given its position in the log, and the
    upstream API whose events it carries (``chat`` completions or ``responses``)."""

    api: str

    @property
    def upstream(self) -> str | None:
        """The upstream to ask (a conversation continuing where it lives), or None: the pool's choice."""

    @property
    def alias(self) -> str | None:
        """The relay's own id for the answer (a background response), remembered with the upstream's."""

    def start(self, stream_id: str) -> bytes | None:
        """The first event, before the upstream has said anything (or None)."""

    def chunk(self, chunk: Chunk, seq: int) -> bytes | None:
        """One upstream chunk as an event at ``seq`` (None: nothing for this view)."""

    def end(self, ending: Ending, seq: int) -> bytes | None:
        """The last event."""
