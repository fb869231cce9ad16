"""An upstream's events as chunks: what each one is, and what the answer has said so far.

Both upstream APIs arrive as SSE events (relay/sse.py decodes them): chat completions'
``data:`` lines ending with ``[DONE]``, and the Responses API's typed events ending with
``response.completed``, ``.incomplete`` or ``.failed``.  Each event becomes a ``Chunk``: its data
exactly as sent, every whole key blanked (an upstream, or a proxy before it, that echoes the key
must not pass it on), its JSON, and whether it carries a delta.  The parser also keeps what the
answer said of itself: its finish reason, usage, the upstream's id for it, and its failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from relay.sse import Event
from relay.upstream.errors import UpstreamError, error_from_body
from relay.upstream.metadata import Redactor


@dataclass(frozen=True, slots=True)
class Chunk:
    """One upstream event: the data exactly as sent (whole keys blanked), its parsed JSON, and
    whether it carries a delta (content, reasoning or a tool call in any choice): the one rule
    every view counts deltas by."""

    data: str
    obj: dict[str, Any]
    delta: bool
    #: The event's name (the Responses API's ``event:`` line); None for chat completions.
    event: str | None = None


#: The two upstream APIs an answer can come from.
CHAT: Final = "chat"
RESPONSES: Final = "responses"
#: Responses API events that carry part of the answer (the idle clock counts from the last one).
RESPONSES_DELTAS: Final = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
    "response.reasoning_summary_text.delta", "response.reasoning_text.delta", "response.audio.delta",
    "response.audio.transcript.delta", "response.custom_tool_call_input.delta", "response.code_interpreter_call_code.delta",
})
#: Responses API events that end an answer as the upstream meant it (``response.failed`` is the
#: upstream's own account of a failure, passed on as it is).
RESPONSES_ENDS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})


class Parser:
    """One answer's events, parsed in order (``parse``); its state is the answer's so far.
    (relay/upstream/response.py's ``UpstreamResponse`` extends it: one object per answer.)"""

    __slots__ = ("_api", "_redact", "ended", "failure", "finish_reason", "request_id", "response_id", "usage")

    def __init__(self, api: str, redact: Redactor, request_id: str | None) -> None:
        self._api = api
        self._redact = redact
        #: The upstream's id for the request, for the errors raised here.
        self.request_id = request_id
        #: The answer's last event has come (``[DONE]`` or a terminal Responses event).
        self.ended = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        #: The Responses API's id for this answer (the upstream's), once an event named it.
        self.response_id: str | None = None
        #: The upstream's own error event (Responses API), relayed as sent: how the answer failed.
        self.failure: UpstreamError | None = None

    def parse(self, events: list[Event], chunks: list[Chunk]) -> bool:
        """Append the chunks ``events`` make to ``chunks``; whether one of them moved the answer on
        (a delta, its finish or its end: the idle clock counts from there).  An error the upstream
        sent is raised after the chunks before it."""
        if self._api == RESPONSES:
            return self._parse_responses(events, chunks)
        touched = False
        chunk_redact = self._redact.chunk
        for event in events:
            data = event.data
            if event.error is not None or event.event == "error":
                raise self._event_error(event)
            if data == "[DONE]":
                self.ended = True
                break
            # An upstream (or a proxy before it) that echoes the key in an id, a model name or a
            # fingerprint must not pass it on: one case-blind search per chunk.
            data = chunk_redact(data)
            obj = self._object(data)
            if obj.get("error") or obj.get("object") == "error":
                # ``{"object": "error", ...}``: vLLM's ErrorResponse before it nested the error.
                raise error_from_body(obj, status=None, request_id=self.request_id, midstream=True,
                                      redact=self._redact, raw=data)
            delta = False
            for choice in obj.get("choices") or ():
                if isinstance(choice, dict):
                    if choice.get("finish_reason"):
                        self.finish_reason = str(choice["finish_reason"])
                    if not delta:
                        d = choice.get("delta")
                        delta = isinstance(d, dict) and bool(
                            d.get("content") or d.get("tool_calls") or d.get("reasoning_content")
                            or d.get("reasoning"))
            if obj.get("usage"):
                self.usage = obj["usage"]
            if delta or self.finish_reason is not None:
                touched = True
            chunks.append(Chunk(data, obj, delta))
        return touched

    def _parse_responses(self, events: list[Event], chunks: list[Chunk]) -> bool:
        """Responses API events: typed (``event:`` and the data's ``type``), no ``[DONE]``; the
        answer ends with ``response.completed``, ``.incomplete`` or ``.failed``, an ``error`` event
        is a failure."""
        touched = False
        for event in events:
            if event.error is not None:
                raise self._event_error(event)
            data = self._redact.chunk(event.data)
            obj = self._object(data)
            kind = obj.get("type") if isinstance(obj.get("type"), str) else event.event
            if kind == "error" or event.event == "error":
                # OpenAI's error event ({"type": "error", "code", "message", "param"} as documented,
                # or with the error object nested under "error" as the API sends it now): the
                # upstream's own honest ending, relayed as sent (an SDK raises on it exactly as
                # it would reading the upstream), with the ``response.failed`` that may follow.
                err = {k: v for k, v in obj.items() if k not in ("type", "sequence_number")}
                self.failure = error_from_body({"error": err.get("error", err)}, status=None,
                                               request_id=self.request_id, midstream=True, redact=self._redact)
                self.finish_reason = "failed"  # so the stream may end here
                touched = True
                # An error's words may quote a piece of the key (an auth failure does): every
                # piece blanked, not only whole keys as in the other events.
                quoted = self._redact(data)
                chunks.append(Chunk(quoted, obj if quoted == data else self._object(quoted), False,
                                    event.event if event.event != "message" else None))
                continue
            delta = kind in RESPONSES_DELTAS
            if self.response_id is None:
                response = obj.get("response")
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    self.response_id = response["id"]
            # Framed again as it came: with its ``event:`` line, or (OpenRouter and others send
            # data lines only) without one; the decoder's "message" is the spec's default, not a
            # line the upstream sent (no Responses event is named "message").
            chunks.append(Chunk(data, obj, delta, event.event if event.event != "message" else None))
            if kind in RESPONSES_ENDS:
                self.finish_reason = kind.removeprefix("response.")
                response = obj.get("response")
                if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                    self.usage = response["usage"]
                self.ended = True
            if delta or self.ended:
                touched = True
            if self.ended:
                break
        return touched

    def _object(self, data: str) -> dict[str, Any]:
        """An event's data as the JSON object every event of both APIs is, or its UpstreamError."""
        try:
            obj = json.loads(data)
        except ValueError:
            raise UpstreamError("upstream_error", "the upstream sent an event whose data is not JSON",
                                retriable=True, request_id=self.request_id, failover=True) from None
        if not isinstance(obj, dict):
            raise UpstreamError("upstream_error", "the upstream sent an event that is not a JSON object",
                                retriable=True, request_id=self.request_id, failover=True)
        return obj

    def _event_error(self, event: Event) -> UpstreamError:
        """An error that is not a ``data:`` chunk: llama.cpp's ``error:`` field line (its value is
        the error object itself), or an ``event: error`` whose data may lack the ``error`` key or
        not be JSON.  Either becomes ``{"error": ...}``, the form every OpenAI client reads."""
        text = event.error if event.error is not None else event.data
        try:
            obj: Any = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("error"):
            return error_from_body(obj, status=None, request_id=self.request_id, midstream=True,
                                   redact=self._redact, raw=text)
        if isinstance(obj, dict):
            raw = '{"error":' + text.strip() + "}"  # the upstream's own object, byte for byte inside
        else:
            obj = {"message": text.strip() or "the upstream sent an error event"}
            raw = None
        return error_from_body({"error": obj}, status=None, request_id=self.request_id, midstream=True,
                               redact=self._redact, raw=raw)
