"""Streams: one generation each, an event log that subscribers replay and follow.

One producer task per stream pulls the upstream and appends encoded events to a log bounded
in bytes; any number of subscribers (HTTP responses) read the log from their own position and
wait on one pulse per batch.  That meeting point makes a reconnect cheap (replay what was
missed, then follow) and a disconnect precise: when the last subscriber leaves and nobody
comes back within the resume grace, the producer is cancelled and the upstream connection
closed.

Event ids are ``<stream id>.<sequence>``: the stream id (128 random bits, the capability to
read or stop the stream) finds the stream, the sequence the position.  ``<stream id>.end``
marks an event after which a client has nothing more to get (a reconnect gets 204).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any, Final

from relay.accounting import log_finished
from relay.sse import encode
from relay.upstream import UpstreamClient, UpstreamError, UpstreamResponse

if TYPE_CHECKING:  # the registry creates streams; a stream reports back to it
    from relay.registry import Registry

log = logging.getLogger("relay.streams")

END_MARK: Final = "end"


class ResumeExpired(Exception):
    """The position asked for has already left the bounded log."""


def new_stream_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits, URL- and header-safe, no "."


def parse_event_id(value: str) -> tuple[str, int | None] | None:
    """``"<id>.<n>"`` → ``(id, n)``; ``"<id>.end"`` → ``(id, None)``; anything else → None."""
    stream_id, dot, pos = value.strip().rpartition(".")
    if not dot or not stream_id or len(stream_id) > 64:
        return None
    if pos == END_MARK:
        return stream_id, None
    if not pos.isdigit() or len(pos) > 12:
        return None
    return stream_id, int(pos)


#: One encoder for every event: json.dumps with any non-default option builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: Any) -> str:
    return _encode(obj)


class Subscriber:
    """One connected client's position: the sequence number of the next event it needs."""

    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


class Stream:
    """One generation: its producer task, its event log and its subscriber count."""

    def __init__(self, registry: Registry, *, model: str, demo: bool, body: dict[str, Any],
                 wait_for_subscriber: float | None) -> None:
        self.id = new_stream_id()
        self.model = model
        #: The access token (its digest) that started the stream; None without tokens (relay/access.py).
        self.owner: str | None = None
        self._registry = registry
        self._config = registry.config
        self._body = body
        self._events: list[bytes] = []
        self._base = 0  # sequence number of _events[0]
        self._log_bytes = 0
        self.next_seq = 0
        self.finished = False
        self.outcome = ""
        self._subscribers: set[Subscriber] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._first_delta: float | None = None
        self._deltas = 0
        self._bytes = 0
        self._cancel_code = "cancelled"
        self._cancel_message = "the stream was stopped"
        self._timer: asyncio.TimerHandle | None = None
        self._resp: UpstreamResponse | None = None
        self._append({"type": "start", "id": self.id, "model": model, "demo": demo},
                     retry=self._config.retry_ms)
        self.task = asyncio.create_task(self._produce(registry.upstream), name=f"stream-{self.id}")
        if wait_for_subscriber is not None:
            self._arm(wait_for_subscriber, "nobody attached to the stream in time")

    # -- the log -------------------------------------------------------------------------

    def _append(self, obj: dict[str, Any] | str, *, retry: int | None = None) -> None:
        """Add an event (an object, or its JSON already encoded) to the log."""
        data = encode(obj if isinstance(obj, str) else _encode(obj), id=f"{self.id}.{self.next_seq}", retry=retry)
        self._events.append(data)
        self.next_seq += 1
        self._log_bytes += len(data)
        self._bytes += len(data)

    def _trim(self) -> None:
        """Keep the log within ``replay_bytes``, but never drop what an attached client has yet to read.

        A burst larger than the log must not cost a live reader its events; a reader that lags
        by more than four logs' worth loses them (its next read is ``resume_expired``), so
        memory stays bounded even before its send timeout aborts it.
        """
        limit = self._config.replay_bytes
        if self._log_bytes <= limit:
            return
        floor = min((sub.pos for sub in self._subscribers), default=self.next_seq)
        hard = self._log_bytes > 4 * limit
        target = limit * 3 // 4  # drop down to three quarters so eviction is amortised
        drop = 0
        while (drop < len(self._events) - 1 and self._log_bytes > target
               and (hard or self._base + drop < floor)):
            self._log_bytes -= len(self._events[drop])
            drop += 1
        if drop:
            del self._events[:drop]
            self._base += drop

    def _publish(self) -> None:
        self._trim()
        # One wake-up per batch for every waiting subscriber.
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():  # a cancelled subscriber's
                    waiter.set_result(None)

    async def changed(self) -> None:
        """Wait for the next batch of events (or the end)."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def read(self, sub: Subscriber) -> bytes:
        """Everything the subscriber has not yet read, joined; advances its position."""
        pos = sub.pos
        if pos < self._base:
            raise ResumeExpired
        if pos >= self.next_seq:
            return b""
        start = pos - self._base
        sub.pos = self.next_seq
        if start == len(self._events) - 1:
            return self._events[start]
        return b"".join(self._events[start:])

    def end_event(self, obj: dict[str, Any]) -> bytes:
        """An event for one subscriber only (not in the log), after which it has nothing more to get."""
        return encode(dumps(obj), id=f"{self.id}.{END_MARK}")

    # -- subscribers and cancellation ------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def attach(self, pos: int) -> Subscriber:
        sub = Subscriber(pos)
        self._subscribers.add(sub)
        self._disarm()
        return sub

    def detach(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        self._trim()  # what only this client still needed can go now
        if not self._subscribers and not self.finished:
            grace = self._config.resume_grace
            if grace <= 0:
                self.cancel("cancelled", "every client disconnected")
            else:
                self._arm(grace, "every client disconnected and none came back within the resume grace")

    def _arm(self, delay: float, why: str) -> None:
        self._disarm()
        self._timer = self._loop.call_later(delay, self.cancel, "cancelled", why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cancel(self, code: str = "cancelled", message: str = "the stream was stopped by a client") -> None:
        """Stop the generation now; the producer closes the upstream connection."""
        if self.finished or self.task.done():
            return
        self._cancel_code, self._cancel_message = code, message
        self.task.cancel()
        if self._resp is not None:
            # Close the upstream connection now rather than when the producer next runs: on a busy
            # loop that is a whole iteration later, and closing is what stops the billing.  (After
            # task.cancel(), so the producer sees its cancellation, not the closed connection.)
            self._resp.close()

    # -- the producer --------------------------------------------------------------------

    async def _produce(self, upstream: UpstreamClient) -> None:
        try:
            resp = self._resp = await upstream.open(self._body)
            try:
                while chunks := await resp.read():
                    for chunk in chunks:
                        delta = _delta(chunk.obj)
                        if delta is not None:
                            if self._first_delta is None:
                                self._first_delta = self._loop.time()
                            self._deltas += 1
                            self._append(delta)
                    self._publish()
            finally:
                resp.close()
            self._finish({"type": "done", "finish_reason": resp.finish_reason, "usage": resp.usage}, "done")
        except UpstreamError as exc:
            event: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message,
                                     "retriable": exc.retriable}
            if exc.status is not None:
                event["status"] = exc.status
            if exc.retry_after is not None:
                event["retry_after"] = exc.retry_after
            self._finish(event, exc.code)
        except asyncio.CancelledError:
            retriable = self._cancel_code == "shutdown"
            self._finish({"type": "error", "code": self._cancel_code, "message": self._cancel_message,
                          "retriable": retriable}, self._cancel_code,
                         retry=self._config.retry_ms if retriable else None)
            raise
        except Exception:
            log.exception("stream %s: internal error", self.id)
            self._finish({"type": "error", "code": "internal", "message": "the relay failed internally",
                          "retriable": True}, "internal")

    def _finish(self, event: dict[str, Any], outcome: str, *, retry: int | None = None) -> None:
        if self.finished:
            return
        self._disarm()
        self._append(event, retry=retry)
        self.finished = True
        self.outcome = outcome
        self._publish()
        self._registry.finished(self)
        log_finished(log, "stream", self.id, self.model, outcome, started=self._started,
                     first_delta=self._first_delta, now=self._loop.time(), deltas=self._deltas,
                     nbytes=self._bytes, usage=self._resp.usage if self._resp is not None else None)


def _delta(obj: dict[str, Any]) -> str | None:
    """The /chat delta event's JSON for one upstream chunk, or None when it carries no content.

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
    if not reasoning and not tool_calls:
        return '{"type":"delta","content":' + _encode(content) + "}" if content else None
    out: dict[str, Any] = {"type": "delta"}
    if content:
        out["content"] = content
    if reasoning and isinstance(reasoning, str):
        out["reasoning"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    return _encode(out) if len(out) > 1 else None

