"""The Responses API view's wire format: the upstream's typed events as sent, and OpenAI's error event.

Each upstream event goes out byte-identical, re-framed: its ``event:`` line (when it had one) and
its ``data:`` line, then a blank line.  There is no ``[DONE]`` in this API: the answer ends with the
upstream's own ``response.completed`` (or ``.incomplete``, ``.failed``).  A failure mid-answer is
OpenAI's ``error`` event (``type``, ``code``, ``message``, ``param``, ``sequence_number``), never a
made-up ``response.completed``.  Pure: no I/O.
"""

from __future__ import annotations

from relay.core.generation import Ending
from relay.jsoncodec import dumps
from relay.upstream import Chunk


class ResponsesWire:
    __slots__ = ("_seq",)
    api = "responses"

    def __init__(self) -> None:
        #: The upstream's last ``sequence_number``: an error event of the relay's own comes after it.
        self._seq = -1

    @property
    def last_sequence(self) -> int:
        return self._seq

    def start(self, stream_id: str) -> None:
        return None

    def chunk(self, chunk: Chunk, seq: int) -> bytes:
        number = chunk.obj.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self._seq = number
        if chunk.event:
            return f"event: {chunk.event}\ndata: {chunk.data}\n\n".encode()
        return f"data: {chunk.data}\n\n".encode()

    def end(self, ending: Ending, seq: int) -> bytes | None:
        if ending.code == "done":
            return None
        return error_event(ending, self._seq + 1)


def error_event(ending: Ending, sequence_number: int) -> bytes:
    exc = ending.error
    fields = exc.upstream if exc is not None and exc.upstream else {}
    code = fields.get("code") if isinstance(fields.get("code"), str) else ending.code
    obj = {"type": "error", "code": code, "message": ending.message, "param": fields.get("param"),
           "sequence_number": sequence_number}
    return f"event: error\ndata: {dumps(obj)}\n\n".encode()
