"""The Responses API view's wire format: the upstream's typed events as sent, and OpenAI's error event.

Each upstream event goes out byte-identical, re-framed: its ``event:`` line (when it had one) and
its ``data:`` line, then a blank line.  There is no ``[DONE]`` in this API: the answer ends with the
upstream's own ``response.completed`` (or ``.incomplete``, ``.failed``).  A failure mid-answer is
OpenAI's ``error`` event (``type``, ``code``, ``message``, ``param``, ``sequence_number``), never a
made-up ``response.completed``.  Pure: no I/O.

A background response (``background: true``) is the relay's own: it answers with its own id, runs
on when its client leaves, and is read again from its log (relay/http/responses.py).  Its events
are re-encoded so that a client resuming anywhere finds the same numbers: the response's ``id``
is the relay's, and each ``sequence_number`` is the event's position in the relay's log (what
``starting_after`` counts).  The wire keeps the latest response object the events carried, for
``GET /v1/responses/{id}``.
"""

from __future__ import annotations

import json
from typing import Any, Final

from relay.core.wire import Ending
from relay.jsoncodec import dumps
from relay.upstream.chunks import Chunk

#: The last event of a background response that ended as the upstream meant it (its own
#: ``response.completed`` came before): a comment, which every reader skips, marking the end for the
#: shared store.  One line, no blank line after it, like a keepalive.
END: Final = b":end\n"


class ResponsesWire:
    __slots__ = ("_background", "_seq", "_upstream", "input_items", "snapshot")
    api = "responses"

    def __init__(self, background_id: str | None = None, upstream: str | None = None) -> None:
        #: The upstream a continued conversation lives on (relay/upstream/pool.py), if known.
        self._upstream = upstream
        #: The upstream's last ``sequence_number``: an error event of the relay's own comes after it.
        self._seq = -1
        self._background = background_id
        #: The latest response object the events carried (background responses).
        self.snapshot: dict[str, Any] | None = None
        #: A background response's input, as ``/input_items`` lists it.
        self.input_items: list[dict[str, Any]] = []

    @property
    def last_sequence(self) -> int:
        return self._seq

    def start(self, stream_id: str) -> None:
        return None

    def chunk(self, chunk: Chunk, seq: int) -> bytes:
        if self._background is not None:
            return self._own(chunk, seq)
        number = chunk.obj.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self._seq = number
        return _frame(chunk.event, chunk.data)

    def _own(self, chunk: Chunk, seq: int) -> bytes:
        obj = json.loads(chunk.data)  # a copy: the chunk's own object stays the upstream's
        obj["sequence_number"] = self._seq = seq
        response = obj.get("response")
        if isinstance(response, dict):
            response["id"] = self._background
            response["background"] = True
            self.snapshot = response
        return _frame(chunk.event, dumps(obj))

    @property
    def alias(self) -> str | None:
        return self._background

    @property
    def upstream(self) -> str | None:
        return self._upstream

    def set_id(self, response_id: str) -> None:
        """The relay's id for this background response (its generation's, known once it exists)."""
        self._background = response_id

    @staticmethod
    def snapshot_of(events: list[bytes]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, bool]:
        """From a background response's logged events (read back from the shared store): the latest
        response object, the error event it ended with (if any), and whether it ended as meant."""
        latest: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        for data in events:
            if data == END:
                return latest, failure, True
            for line in data.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                obj = json.loads(line[len(b"data: "):])
                if isinstance(obj.get("response"), dict):
                    latest = obj["response"]
                elif obj.get("type") == "error":
                    # (the documented flat fields, or the error object nested as the API sends it)
                    failure = obj["error"] if isinstance(obj.get("error"), dict) else obj
        return latest, failure, False

    def end(self, ending: Ending, seq: int) -> bytes | None:
        if ending.code == "done" or ending.relayed:
            return END if self._background is not None else None
        return error_event(ending, self._seq + 1)


def _frame(event: str | None, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode() if event else f"data: {data}\n\n".encode()


def error_event(ending: Ending, sequence_number: int | None) -> bytes:
    exc = ending.error
    fields = exc.upstream if exc is not None and exc.upstream else {}
    code = fields.get("code") if isinstance(fields.get("code"), str) else ending.code
    obj = {"type": "error", "code": code, "message": ending.message, "param": fields.get("param"),
           "sequence_number": sequence_number}
    return _frame("error", dumps(obj))
