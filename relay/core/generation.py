"""A generation: one answer of the model, whichever endpoint asked for it.

One producer task pulls the upstream and appends encoded events to a log bounded in bytes
(relay/core/eventlog.py); any number of subscribers (HTTP responses, relay/core/fanout.py) read
the log from their own position and are handed, or woken for, each batch.  This class is the
producer and its lifecycle: what decides when to read, to pause, to stop, and how it ended.  That meeting point makes a reconnect cheap (replay what was missed, then
follow) and a disconnect precise: when the last subscriber leaves and nobody comes back within
the grace, the producer is cancelled and the upstream connection closed.

What the events look like is the view's business, not the core's: each generation is given a
``Wire`` (``/chat``'s typed events, ``/v1``'s pass-through chunks) that turns upstream chunks and
the ending into bytes.  Everything else (the cap, the drain, the delta count, the log line,
cancellation) is the same for every endpoint, because it is this one class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from relay.config import Config
from relay.core.eventlog import EventLog, ResumeExpired
from relay.core.fanout import Fanout, Subscriber
from relay.core.ids import new_stream_id
from relay.core.logline import answered_upstream, log_finished, token_counts
from relay.core.store import Mirror
from relay.upstream.client import Completion
from relay.upstream.errors import UpstreamError
from relay.upstream.response import Chunk
from relay.upstream.pool import Pool, PooledResponse

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from relay.metrics import Metrics

log = logging.getLogger("relay.generation")

#: Presence checks in flight (a task must be referenced until it is done).
_checks: set[asyncio.Task[None]] = set()


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


class Generation:
    """One answer: its producer task, its event log and its subscribers.

    ``resumable`` generations (``/chat``) keep ``replay_bytes`` of log for reconnects, wait out
    the resume grace when their last client leaves and are kept after they finish; the others
    (``/v1``, OpenAI's semantics) keep only what their client has yet to read and stop the
    moment it leaves.  ``streaming=False`` asks the upstream for one JSON answer (``completion``).
    """

    # Thousands are alive at once: slots keep each one small.
    __slots__ = ("_alone_floor", "_body", "_bytes", "_cancel_code", "_cancel_message", "_committed",
                 "_config", "_deltas", "_first_delta", "_gap", "_grace", "_held", "_keep", "_label", "_last_delta",
                 "_loop", "_metrics", "_on_finished", "background", "_resp", "_started", "_subscribers", "_timer", "_upstream", "completion",
                 "attempts", "client", "ending", "finished", "id", "kind", "log", "mirror", "model",
                 "opened", "owner", "paused", "remote", "request_id", "resumable", "streaming", "task", "wire")

    def __init__(self, *, kind: str, config: Config, upstream: Pool, wire: Wire, model: str,
                 body: dict[str, Any], on_finished: Callable[[Generation], None],
                 resumable: bool = True, streaming: bool = True, metrics: Metrics | None = None,
                 background: bool = False) -> None:
        self.id = new_stream_id()
        self.kind = kind
        self.model = model
        self.resumable = resumable
        self.streaming = streaming
        #: The access token (its digest) that started it; None without tokens (relay/http/access.py).
        self.owner: str | None = None
        #: The client's address, for the log line (never a metrics label).
        self.client: str | None = None
        self._config = config
        self._upstream = upstream
        self.wire = wire
        self._body = body
        self._on_finished = on_finished
        self._keep = config.replay_bytes if resumable else 0
        self._grace = config.resume_grace if resumable else 0.0
        #: Runs to its end whether or not anyone listens (a background response): never stopped for
        #: nobody, never paused for a full log with no reader (the oldest events go instead).
        self.background = background
        #: Its events (relay/core/eventlog.py): what every reader reads from its own position.
        self.log = EventLog()
        #: The upstream answered 2xx (headers in): from here its failures are in-stream, not a status.
        self.opened = False
        self.request_id: str | None = None
        self.completion: Completion | None = None
        self.finished = False
        self.ending: Ending | None = None
        #: Its readers (relay/core/fanout.py), each at its own position in the log.
        self._subscribers = Fanout(asyncio.get_running_loop())
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._first_delta: float | None = None
        self._deltas = 0
        self._bytes = 0
        self._cancel_code = "cancelled"
        self._cancel_message = "the stream was stopped"
        self._timer: asyncio.TimerHandle | None = None
        self._resp: PooledResponse | None = None
        self.task: asyncio.Task[None] | None = None
        #: ``upstream:outcome`` for every upstream tried, in order (relay/upstream/pool.py).
        self.attempts: list[str] = []
        #: The producer has stopped reading the upstream until a reader can take more (backpressure).
        self.paused = False
        #: Something of the answer is in the log: no other upstream may take over now.
        self._committed = False
        self._last_delta = 0.0
        #: With no subscriber attached: where the last one left off (0 before the first came), so
        #: the log keeps what a reconnect resumes from while the producer reads ahead of it.
        self._alone_floor = 0
        #: Its copy in the shared store (relay/core/store.py); None with the memory store.
        self.mirror: Mirror | None = None
        #: Chunks read while the store's lease may have lapsed, held until it is confirmed, and
        #: the confirmation (``_hold``).
        self._held: tuple[list[Chunk], asyncio.Task[None]] | None = None
        #: A reader on another instance follows it (its log there, not this one, serves that reader).
        self.remote = False
        self._metrics = metrics
        self._gap: Histogram | None = None
        self._label = model
        if metrics is not None:
            self._label = metrics.model_label(model)
            # The one per-chunk measurement: its labelled child is looked up once, here.
            self._gap = metrics.chunk_gap.labels(kind, self._label)
            metrics.started.labels(kind, self._label).inc()
            metrics.live_streams.labels(kind).inc()

    def start(self, wait_for_subscriber: float | None = None) -> None:
        """Write the first event and start the producer; with ``wait_for_subscriber``, cancel it
        if no client has attached by then."""
        data = self.wire.start(self.id)
        if data is not None:
            self._append(data)
        self.task = asyncio.create_task(self._produce(), name=f"{self.kind}-{self.id}")
        self.task.add_done_callback(self._producer_done)
        if wait_for_subscriber is not None:
            self._arm(wait_for_subscriber, "nobody attached to the stream in time")

    # -- the log -------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The sequence number of its next event (all of its events so far, counted)."""
        return self.log.next_seq

    @property
    def log_bytes(self) -> int:
        """The bytes its log holds now."""
        return self.log.nbytes

    def _append(self, data: bytes, last: bool = False) -> None:
        seq = self.log.append(data)
        if self.mirror is not None:
            self.mirror.append(seq, data, last)
        self._bytes += len(data)

    def logged(self) -> tuple[int, list[bytes]]:
        """The sequence number of the first event still in memory, and the events from there."""
        return self.log.snapshot()

    def _trim(self) -> None:
        """Keep the log within its bound, but never drop what an attached client has yet to read.

        A burst larger than the log must not cost a live reader its events; a reader that lags
        by more than four replay logs' worth loses them (its next read is ``ResumeExpired``),
        so memory stays bounded even before its send timeout aborts it.
        """
        keep = self._keep
        log = self.log
        if log.nbytes <= keep:
            return
        alone = self._alone_floor if self.resumable and not self.finished else log.next_seq
        floor = self._subscribers.floor(alone)
        # Down to three quarters, so eviction is amortised.
        log.trim(keep * 3 // 4, floor, hard=log.nbytes > 4 * self._config.replay_bytes)

    def _publish(self) -> None:
        self._trim()
        gone = self._subscribers.publish(self.log, self.finished)
        for sub in gone or ():
            # Its client has gone: leave now rather than when its handler next runs, so the last
            # one leaving closes the upstream in this very step.
            self.detach(sub)

    async def changed(self, sub: Subscriber) -> None:
        """Wait for the next batch of events (unless the sink took it), the upstream's answer, or the end."""
        await self._subscribers.changed(sub)

    def read(self, sub: Subscriber) -> bytes:
        """Everything the subscriber has not yet read, joined; advances its position.

        A subscriber whose sink refused was blocked from that step (``_publish``); reading is its
        handler taking over, so it is unblocked here (and blocks again if its client still lags).
        """
        if sub.blocked:
            self.unblock(sub)
        data = self.log.read(sub.pos)
        if data:
            sub.pos = self.log.next_seq
        return data

    # -- subscribers and cancellation ------------------------------------------------------

    @property
    def outcome(self) -> str:
        """``done`` or the error code it ended with; empty while it runs."""
        return self.ending.code if self.ending is not None else ""

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def attach(self, pos: int, sink: Callable[[bytes], bool] | None = None) -> Subscriber:
        sub = Subscriber(pos, sink)
        self._subscribers.add(sub)
        if self._metrics is not None:
            self._metrics.live_subscribers.labels(self.kind).inc()
        self._disarm()
        self._wake()
        return sub

    def detach(self, sub: Subscriber) -> None:
        if sub not in self._subscribers:
            return
        self._subscribers.discard(sub)
        if self._metrics is not None:
            self._metrics.live_subscribers.labels(self.kind).dec()
            if not self.finished:
                self._metrics.disconnects.labels(self.kind).inc()
        if not self._subscribers:
            self._alone_floor = sub.pos
        self._trim()  # what only this client still needed can go now
        self._wake()
        if not self._subscribers and not self.finished and not self.background:
            if self._grace <= 0:
                self._unheard("every client disconnected")
            else:
                self._arm(self._grace, "every client disconnected and none came back within the resume grace")

    # -- backpressure ----------------------------------------------------------------------
    # The producer reads the upstream only while someone can take what it reads: when every
    # attached reader's send buffer is full, it stops (TCP then holds the upstream back; the
    # answer is paced by its fastest reader, not lost).  With no reader attached (the resume
    # grace, or a 201 stream not yet opened) it reads until the replay log is full from where the
    # last reader left off (``_trim`` keeps that part), then waits the same way.  A reader that
    # never drains is still cut by --send-timeout, which detaches it.

    def block(self, sub: Subscriber) -> None:
        sub.blocked = True

    def unblock(self, sub: Subscriber) -> None:
        sub.blocked = False
        self._wake()

    def _stalled(self) -> bool:
        if self._subscribers:
            return self._subscribers.all_blocked()
        return self.resumable and self.log_bytes >= self._keep and not self.remote and not self.background

    def _wake(self) -> None:
        """Something changed for the readers: read the upstream again if it was paused for them."""
        if self.paused and not self._stalled():
            self.paused = False
            if self._resp is not None:
                self._resp.resume()

    def _pause(self) -> None:
        if self._resp is not None:
            self.paused = True
            self._resp.pause()

    def _arm(self, delay: float, why: str) -> None:
        self._disarm()
        self._timer = self._loop.call_later(delay, self._expire, why)

    def _expire(self, why: str) -> None:
        """Nobody here reads it: stop, unless a reader on another instance does (shared store)."""
        self._timer = None
        if self.mirror is None or self.finished:
            self._unheard(why)
            return
        mirror = self.mirror
        task = self._loop.create_task(self._expire_unless_listened(mirror, why))
        _checks.add(task)
        task.add_done_callback(_checks.discard)

    async def _expire_unless_listened(self, mirror: Mirror, why: str) -> None:
        listened = await mirror.listened()
        if self.finished or self._subscribers or self._timer is not None:
            return  # someone came back here meanwhile
        if listened:
            self.remote = True
            self._wake()
            self._arm(mirror.recheck, why)
        else:
            self._unheard(why)

    def _unheard(self, why: str) -> None:
        """Nobody listens: stop, and count the upstream closed for nobody and what no client got."""
        if self._metrics is not None and not self.finished and self.task is not None:
            self._metrics.unheard.labels(self.kind).inc()
            self._metrics.unrelayed.labels(self.kind).inc(max(0, self.next_seq - self._alone_floor))
        self.cancel("cancelled", why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cancel(self, code: str = "cancelled", message: str = "the stream was stopped by a client") -> None:
        """Stop the generation now; the upstream connection is closed at once."""
        task = self.task
        if self.finished or task is None or task.done():
            return
        self._cancel_code, self._cancel_message = code, message
        task.cancel()
        if self._resp is not None:
            # Close the upstream connection now rather than when the producer next runs: on a busy
            # loop that is a whole iteration later, and closing is what stops the billing.  (After
            # task.cancel(), so the producer sees its cancellation, not the closed connection.)
            self._resp.abort()

    # -- the producer --------------------------------------------------------------------

    async def _produce(self) -> None:
        try:
            ending = await (self._stream() if self.streaming else self._complete())
        except UpstreamError as exc:
            # Cancelled from within its own step (the last client found gone), the closed
            # connection can surface before the cancellation does: it is still a cancel.
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            ending = self._cancelled() if cancelled else Ending(exc.code, exc.message, exc.retriable, error=exc)
        except asyncio.CancelledError:
            self._finish(self._cancelled())
            raise
        except Exception:
            log.exception("%s %s: internal error", self.kind, self.id)
            ending = Ending("internal", "the relay failed internally", retriable=True)
        self._finish(ending)

    def _producer_done(self, task: asyncio.Task[None]) -> None:
        # A cancelled producer's task holds its CancelledError, whose traceback holds the
        # producer's frame, which holds this generation: forget the task, or every cancelled
        # generation is a reference cycle that only the cyclic GC frees (its pauses were most of
        # the disconnect tail in bench/RESULTS.md).
        if self.task is task:
            self.task = None

    def _cancelled(self) -> Ending:
        return Ending(self._cancel_code, self._cancel_message,
                      retriable=self._cancel_code in ("shutdown", "interrupted"))

    def _answered(self, request_id: str | None) -> None:
        self.opened = True
        self.request_id = request_id
        self._publish()  # a view holding its status line for this can commit now

    async def _stream(self) -> Ending:
        wire = self.wire
        resp = self._resp = await self._upstream.open(self._body, self.attempts, wire.api, upstream=wire.upstream,
                                                      alias=wire.alias)
        self._body = {}  # the pool keeps it while another upstream may still be asked
        self._answered(resp.request_id)
        try:
            await resp.run(self._take)
            if self._held is not None:
                await asyncio.shield(self._held[1])  # what was held goes out (or the stream was ended)
        finally:
            resp.close()
        failure = resp.failure
        if failure is not None:
            return Ending(failure.code, failure.message, failure.retriable, finish_reason=resp.finish_reason,
                          usage=resp.usage, error=failure, relayed=True)
        return Ending("done", finish_reason=resp.finish_reason, usage=resp.usage)

    def _take(self, chunks: list[Chunk]) -> None:
        """One batch of the upstream's chunks (everything that had arrived): logged and handed to
        the waiting readers in the same step (their sinks write it), with no task switch."""
        resp = self._resp
        assert resp is not None
        mirror = self.mirror
        if mirror is not None and (self._held is not None or not mirror.leased()):
            self._hold(mirror, chunks)
            return
        wire = self.wire
        gap = self._gap
        for chunk in chunks:
            if chunk.delta:
                if gap is not None:
                    now = self._loop.time()
                    if self._first_delta is None:
                        self._first_token(now, resp.upstream)
                    else:
                        gap.observe(now - self._last_delta)
                    self._last_delta = now
                elif self._first_delta is None:
                    self._first_delta = self._loop.time()
                self._deltas += 1
            data = wire.chunk(chunk, self.next_seq)
            if data is not None:
                self._append(data)
                if not self._committed:
                    # Something of this answer is out: no other upstream may take over now.
                    resp.commit()
                    self._committed = True
        self._publish()
        if not self.finished and self._stalled():
            self._pause()

    def _hold(self, mirror: Mirror, chunks: list[Chunk]) -> None:
        """The store's lease may have lapsed (this process was stopped, or its loop held, past it):
        a reader elsewhere may already have ended the stream.  Nothing more goes to the readers
        until the store says the stream is still ours; if it is not, the generation ends with the
        same ``interrupted`` the others got (the store cancels it), and what was held is dropped."""
        if self._held is None:
            task = self._loop.create_task(self._confirm(mirror))
            _checks.add(task)
            task.add_done_callback(_checks.discard)
            self._held = ([], task)
        self._held[0].extend(chunks)
        self._pause()

    async def _confirm(self, mirror: Mirror) -> None:
        ours = await mirror.confirm()
        held = self._held
        self._held = None
        if self.finished or not ours or held is None:
            return
        if held[0]:
            self._take(held[0])
        self._wake()

    def _first_token(self, now: float, upstream: str) -> None:
        self._first_delta = now
        if self._metrics is not None:
            self._metrics.ttft.labels(self.kind, self._label, upstream).observe(now - self._started)

    async def _complete(self) -> Ending:
        answer = await self._upstream.complete(self._body, self.attempts, self.wire.api, upstream=self.wire.upstream)
        self._body = {}
        self.completion = answer
        self._first_token(self._loop.time(), answered_upstream(self.attempts))
        choices = answer.obj.get("choices")
        self._deltas = len(choices) if isinstance(choices, list) else 0
        self._bytes += len(answer.raw)
        usage = answer.obj.get("usage")
        self._answered(answer.request_id)
        return Ending("done", usage=usage if isinstance(usage, dict) else None)

    def _finish(self, ending: Ending) -> None:
        if self.finished:
            return
        self._disarm()
        data = self.wire.end(ending, self.next_seq)
        if data is not None:
            self._append(data, last=True)
        self.finished = True
        self.ending = ending
        self._publish()
        self._on_finished(self)
        usage = ending.usage if ending.usage is not None else (self._resp.usage if self._resp is not None else None)
        now = self._loop.time()
        if self._metrics is not None:
            self._count_finish(ending.code, now, usage)
        log_finished(log, self.kind, self.id, self.model, ending.code, started=self._started,
                     first_delta=self._first_delta, now=now, deltas=self._deltas,
                     nbytes=self._bytes, usage=usage, attempts=self.attempts, client=self.client,
                     status=200 if self.opened else (ending.error.status if ending.error is not None else None))

    def _count_finish(self, outcome: str, now: float, usage: dict[str, Any] | None) -> None:
        metrics = self._metrics
        assert metrics is not None
        upstream = answered_upstream(self.attempts)
        metrics.finished.labels(self.kind, self._label, upstream, outcome).inc()
        metrics.live_streams.labels(self.kind).dec()
        metrics.duration.labels(self.kind, self._label, outcome).observe(now - self._started)
        for kind, count in token_counts(usage):
            metrics.tokens.labels(self._label, upstream, kind).inc(count)
