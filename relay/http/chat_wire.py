"""The ``/chat`` view's wire format: unnamed events whose data is one JSON object with a ``type``.

``start`` first (with the ``retry:`` hint), a ``delta`` per upstream chunk that carries content,
reasoning or tool calls, then exactly one ``done`` or ``error``.  Every event has the id
``<stream id>.<position>`` (relay/core/ids.py).  Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from relay.core.ids import event_id
from relay.core.wire import Ending
from relay.jsoncodec import dumps
from relay.sse import encode
from relay.upstream.chunks import Chunk


class ChatWire:
    __slots__ = ("_demo", "_id", "_model", "_retry_ms")
    api = "chat"
    upstream: str | None = None
    alias: str | None = None

    def __init__(self, *, model: str, demo: bool, retry_ms: int) -> None:
        self._model = model
        self._demo = demo
        self._retry_ms = retry_ms
        self._id = ""

    def start(self, stream_id: str) -> bytes:
        self._id = stream_id
        return encode(dumps({"type": "start", "id": stream_id, "model": self._model, "demo": self._demo}),
                      id=event_id(stream_id, 0), retry=self._retry_ms)

    def chunk(self, chunk: Chunk, seq: int) -> bytes | None:
        data = delta_event(chunk.obj) if chunk.delta else None
        return None if data is None else encode(data, id=f"{self._id}.{seq}")

    def end(self, ending: Ending, seq: int) -> bytes:
        retry = None
        if ending.code == "interrupted":
            # Ended elsewhere while this process was stopped (relay/core/redis_writer.py): its own
            # readers get the very event readers elsewhere got.
            return interrupted_event(self._id, self._retry_ms)
        if ending.code == "done":
            event: dict[str, Any] = {"type": "done", "finish_reason": ending.finish_reason, "usage": ending.usage}
        else:
            event = {"type": "error", "code": ending.code, "message": ending.message, "retriable": ending.retriable}
            exc = ending.error
            if exc is not None and exc.status is not None:
                event["status"] = exc.status
            if exc is not None and exc.retry_after is not None:
                event["retry_after"] = exc.retry_after
            if exc is not None and exc.upstream is not None and exc.status not in (401, 403):
                event["upstream"] = exc.upstream
            if exc is not None and exc.attempts > 1:
                event["attempts"] = exc.attempts  # upstreams tried; the message is the last one's
            if ending.code == "shutdown":
                retry = self._retry_ms  # so EventSource and the page come back after the restart
        return encode(dumps(event), id=f"{self._id}.{seq}", retry=retry)



RESUME_EXPIRED: dict[str, Any] = {
    "type": "error", "code": "resume_expired", "retriable": False,
    "message": "the events after your position are no longer kept; start a new chat"}

def last_event(stream_id: str, event: dict[str, Any]) -> bytes:
    """An event for one subscriber only (not in the log), after which it has nothing more to get."""
    return encode(dumps(event), id=event_id(stream_id, None))


def internal_event(message: str, retry_ms: int) -> bytes:
    """The last event of a response whose handler failed (relay/http/crashes.py): no id, retriable."""
    return encode(dumps({"type": "error", "code": "internal", "retriable": True, "message": message}),
                  retry=retry_ms)


def unavailable_event(message: str, retry_ms: int) -> bytes:
    """The end of a reader here of a stream whose copy stopped arriving (the shared store is away).

    It has no id on purpose: the client's last event id stays the last event it really got, so
    its reconnect (after ``retry``) resumes from there, on whatever state the stream is in then.
    """
    return encode(dumps({"type": "error", "code": "store_unavailable", "retriable": True,
                         "message": f"{message}; reconnect to go on"}), retry=retry_ms)


def interrupted_event(stream_id: str, retry_ms: int) -> bytes:
    """The end of a stream whose producing process died (shared store).

    Whoever finds the producer gone appends it to the shared log, atomically and once
    (relay/core/redis_store.py), so every reader sees the same event.  Its id is the end mark,
    not a position: the dead producer may have sent its own readers events that never reached
    Redis, under the very positions the end now takes there, and a client holding one of those
    ids must still get the end rather than a 204.
    """
    return encode(dumps({"type": "error", "code": "interrupted", "retriable": True,
                         "message": "the relay process producing this answer stopped before it ended; what it "
                                    "generated is above; send the request again"}),
                  id=event_id(stream_id, None), retry=retry_ms)
def delta_event(obj: dict[str, Any]) -> str | None:
    """The delta event's JSON for one upstream chunk, or None when its first choice carries nothing.

    Most chunks carry only text: their event is built around the encoded string alone, which
    is the same JSON as encoding the whole object, at a fraction of the cost.
    """
    choices = obj.get("choices")
    if not choices or not isinstance(choices, list):
        return None
    choice = choices[0]
    if not isinstance(choice, dict):
        return None
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return None
    content = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    tool_calls = delta.get("tool_calls")
    if not reasoning and not tool_calls and not isinstance(content, list):
        return '{"type":"delta","content":' + dumps(content) + "}" if content else None
    out: dict[str, Any] = {"type": "delta"}
    parts: list[Any] = []
    if isinstance(content, list):
        content, thinking, parts = split_parts(content)
        if thinking and not (reasoning and isinstance(reasoning, str)):
            reasoning = thinking
    if content:
        out["content"] = content
    if reasoning and isinstance(reasoning, str):
        out["reasoning"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    if parts:
        out["parts"] = parts
    return dumps(out) if len(out) > 1 else None


def split_parts(parts: list[Any]) -> tuple[str, str, list[Any]]:
    """Content as typed parts (Mistral's reasoning models) → (text, thinking, the other parts).

    ``{"type": "text", "text": ...}`` is answer text; ``{"type": "thinking", "thinking": [...]}``
    (a list of text parts, or a string) is reasoning; any other part is kept whole, in order,
    rather than dropped or turned into a string.
    """
    text: list[str] = []
    thinking: list[str] = []
    other: list[Any] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "thinking":
            inner = part.get("thinking")
            if isinstance(inner, str):
                thinking.append(inner)
            elif isinstance(inner, list):
                thinking.extend(p["text"] for p in inner if isinstance(p, dict) and isinstance(p.get("text"), str))
        else:
            other.append(part)
    return "".join(text), "".join(thinking), other
