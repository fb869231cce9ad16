"""A generation: one answer of the model, whichever endpoint asked for it.

One producer task pulls the upstream and appends encoded events to a log bounded in bytes
(relay/core/eventlog.py); any number of subscribers (HTTP responses, relay/core/fanout.py) read
the log from their own position and are handed, or woken for, each batch.  This class is the
producer and the meeting point: what decides when to read, to pause, to stop, and how it ended.
That makes a reconnect cheap (replay what was missed, then follow) and a disconnect precise: when
the last subscriber leaves and nobody comes back within the grace (relay/core/vigil.py), the
producer is cancelled and the upstream connection closed.

What the events look like is the view's business, not the core's: each generation is given a
``Wire`` (relay/core/wire.py) that turns upstream chunks and the ending into bytes.  Everything
else (the cap, the drain, the counts and the log line in relay/core/tally.py, cancellation) is
the same for every endpoint, because it is this one class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.core import vigil
from relay.core.eventlog import EventLog
from relay.core.fanout import Fanout, Subscriber
from relay.core.hold import Hold
from relay.core.ids import new_stream_id
from relay.core.logline import answered_upstream
from relay.core.tally import Tally
from relay.core.wire import Ending, Wire
from relay.upstream.chunks import Chunk
from relay.upstream.client import Completion
from relay.upstream.errors import UpstreamError
from relay.upstream.pool import Pool
from relay.upstream.route import PooledResponse

if TYPE_CHECKING:
    from relay.core.store import Mirror
    from relay.metrics import Metrics

log = logging.getLogger("relay.generation")


class Generation:
    """One answer: its producer task, its event log and its subscribers.

    ``resumable`` generations (``/chat``) keep ``replay_bytes`` of log for reconnects, wait out
    the resume grace when their last client leaves and are kept after they finish; the others
    (``/v1``, OpenAI's semantics) keep only what their client has yet to read and stop the
    moment it leaves.  ``streaming=False`` asks the upstream for one JSON answer (``completion``).
    """

    # Thousands are alive at once: slots keep each one small.
    __slots__ = ("_alone_floor", "_body", "_cancel_code", "_cancel_message", "_committed", "_grace",
                 "_held", "_loop", "_metrics", "_on_finished", "_resp", "_subscribers", "_upstream",
                 "attempts", "background", "client", "completion", "ending", "finished", "id", "kind",
                 "log", "mirror", "model", "opened", "owner", "paused", "remote", "request_id", "resumable",
                 "streaming", "task", "tally", "vigil", "wire")

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
        self._upstream = upstream
        self.wire = wire
        self._body = body
        self._on_finished = on_finished
        self._grace = config.resume_grace if resumable else 0.0
        #: Runs to its end whether or not anyone listens (a background response): never stopped for
        #: nobody, never paused for a full log with no reader (the oldest events go instead).
        self.background = background
        #: Its events (relay/core/eventlog.py): what every reader reads from its own position.
        self.log = EventLog(config.replay_bytes if resumable else 0, config.replay_bytes)
        #: The upstream answered 2xx (headers in): from here its failures are in-stream, not a status.
        self.opened = False
        self.request_id: str | None = None
        self.completion: Completion | None = None
        self.finished = False
        self.ending: Ending | None = None
        #: Its readers (relay/core/fanout.py), each at its own position in the log.
        self._subscribers = Fanout(asyncio.get_running_loop())
        self._loop = asyncio.get_running_loop()
        #: Its timings and counts, for its metrics and log line (relay/core/tally.py).
        self.tally = Tally(kind, model, metrics, self._loop)
        #: The timer that stops it when nobody listens (relay/core/vigil.py sets it).
        self.vigil: asyncio.TimerHandle | None = None
        self._cancel_code = "cancelled"
        self._cancel_message = "the stream was stopped"
        self._resp: PooledResponse | None = None
        self.task: asyncio.Task[None] | None = None
        #: ``upstream:outcome`` for every upstream tried, in order (relay/upstream/pool.py).
        self.attempts: list[str] = []
        #: The producer has stopped reading the upstream until a reader can take more (backpressure).
        self.paused = False
        #: Something of the answer is in the log: no other upstream may take over now.
        self._committed = False
        #: With no subscriber attached: where the last one left off (0 before the first came), so
        #: the log keeps what a reconnect resumes from while the producer reads ahead of it.
        self._alone_floor = 0
        #: Its copy in the shared store (relay/core/store.py); None with the memory store.
        self.mirror: Mirror | None = None
        #: What it read while the store's lease may have lapsed (relay/core/hold.py).
        self._held: Hold | None = None
        #: A reader on another instance follows it (its log there, not this one, serves that reader).
        self.remote = False
        self._metrics = metrics

    def start(self, wait_for_subscriber: float | None = None) -> None:
        """Write the first event and start the producer; with ``wait_for_subscriber``, cancel it
        if no client has attached by then."""
        data = self.wire.start(self.id)
        if data is not None:
            self._append(data)
        self.task = asyncio.create_task(self._produce(), name=f"{self.kind}-{self.id}")
        self.task.add_done_callback(self._producer_done)
        if wait_for_subscriber is not None:
            vigil.arm(self, wait_for_subscriber, "nobody attached to the stream in time")

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
        self.tally.bytes += len(data)

    def logged(self) -> tuple[int, list[bytes]]:
        """The sequence number of the first event still in memory, and the events from there."""
        return self.log.snapshot()

    def _trim(self) -> None:
        """Keep the log within its bound, but never drop what an attached client has yet to read."""
        log = self.log
        if log.nbytes > log.keep:
            alone = self._alone_floor if self.resumable and not self.finished else log.next_seq
            log.bound(self._subscribers.floor(alone))

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
        vigil.disarm(self)
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
                self.unheard("every client disconnected")
            else:
                vigil.arm(self, self._grace, "every client disconnected and none came back within the resume grace")

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
        return self.resumable and self.log.nbytes >= self.log.keep and not self.remote and not self.background

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

    # -- nobody listening (relay/core/vigil.py) --------------------------------------------

    def heard_elsewhere(self) -> None:
        """A reader on another instance follows it (its log there serves that reader): read on."""
        self.remote = True
        self._wake()

    def unheard(self, why: str) -> None:
        """Nobody listens: stop, and count the upstream closed for nobody and what no client got."""
        if self._metrics is not None and not self.finished and self.task is not None:
            self._metrics.unheard.labels(self.kind).inc()
            self._metrics.unrelayed.labels(self.kind).inc(max(0, self.next_seq - self._alone_floor))
        self.cancel("cancelled", why)

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
                await asyncio.shield(self._held.task)  # what was held goes out (or the stream was ended)
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
        mirror = self.mirror
        if mirror is not None and (self._held is not None or not mirror.leased()):
            held = self._held = self._held or Hold(mirror, self._loop, self._released)
            held.add(chunks)
            self._pause()
            return
        self._log(chunks)

    def _log(self, chunks: list[Chunk]) -> None:
        resp = self._resp
        assert resp is not None
        wire, tally = self.wire, self.tally
        for chunk in chunks:
            if chunk.delta:
                tally.delta(resp)
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

    def _released(self, held: list[Chunk] | None) -> None:
        """The store answered after a hold: what was held goes out, unless the stream is no longer ours."""
        self._held = None
        if self.finished or held is None:
            return
        if held:
            self._log(held)  # (not _take: asked already, it would only be held again)
        self._wake()

    async def _complete(self) -> Ending:
        answer = await self._upstream.complete(self._body, self.attempts, self.wire.api, upstream=self.wire.upstream)
        self._body = {}
        self.completion = answer
        tally = self.tally
        tally.first_token(self._loop.time(), answered_upstream(self.attempts))
        choices = answer.obj.get("choices")
        tally.deltas = len(choices) if isinstance(choices, list) else 0
        tally.bytes += len(answer.raw)
        usage = answer.obj.get("usage")
        self._answered(answer.request_id)
        return Ending("done", usage=usage if isinstance(usage, dict) else None)

    def _finish(self, ending: Ending) -> None:
        if self.finished:
            return
        vigil.disarm(self)
        data = self.wire.end(ending, self.next_seq)
        if data is not None:
            self._append(data, last=True)
        self.finished = True
        self.ending = ending
        self._publish()
        self._on_finished(self)
        usage = ending.usage if ending.usage is not None else (self._resp.usage if self._resp is not None else None)
        status = 200 if self.opened else (ending.error.status if ending.error is not None else None)
        self.tally.finish(self.id, ending.code, usage, self.attempts, self.client, status)
