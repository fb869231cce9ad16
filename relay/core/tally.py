"""What a generation counts of itself: its timings, deltas and bytes, its metrics and its log line.

The producer tells it of each delta (``delta``) and of the end (``finish``); everything a
finished answer reports (relay/core/logline.py's line, the Prometheus counters) comes from here.
The per-delta path is one histogram observation, its labelled child looked up once at the start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from relay.core.logline import answered_upstream, log_finished, token_counts

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from relay.metrics import Metrics

log = logging.getLogger("relay.generation")


class Answering(Protocol):
    @property
    def upstream(self) -> str:
        """The name of the upstream answering now."""


class Tally:
    __slots__ = ("_gap", "_kind", "_label", "_last", "_loop", "_metrics", "_model", "bytes", "deltas",
                 "first", "started")

    def __init__(self, kind: str, model: str, metrics: Metrics | None, loop: asyncio.AbstractEventLoop) -> None:
        self._kind = kind
        self._model = model
        self._loop = loop
        self._metrics = metrics
        self.started = loop.time()
        #: When the first delta came (None before it).
        self.first: float | None = None
        self._last = 0.0
        self.deltas = 0
        self.bytes = 0
        self._gap: Histogram | None = None
        self._label = model
        if metrics is not None:
            self._label = metrics.model_label(model)
            self._gap = metrics.chunk_gap.labels(kind, self._label)
            metrics.started.labels(kind, self._label).inc()
            metrics.live_streams.labels(kind).inc()

    def delta(self, answering: Answering) -> None:
        """One delta of the answer came (asked of ``answering``: its upstream, for the first one)."""
        gap = self._gap
        if gap is not None:
            now = self._loop.time()
            if self.first is None:
                self.first_token(now, answering.upstream)
            else:
                gap.observe(now - self._last)
            self._last = now
        elif self.first is None:
            self.first = self._loop.time()
        self.deltas += 1

    def first_token(self, now: float, upstream: str) -> None:
        self.first = now
        if self._metrics is not None:
            self._metrics.ttft.labels(self._kind, self._label, upstream).observe(now - self.started)

    def finish(self, stream_id: str, outcome: str, usage: dict[str, Any] | None, attempts: Sequence[str],
               client: str | None, status: int | None) -> None:
        """The answer ended with ``outcome``: count it, and write its one log line."""
        now = self._loop.time()
        metrics = self._metrics
        if metrics is not None:
            kind, label = self._kind, self._label
            upstream = answered_upstream(attempts)
            metrics.finished.labels(kind, label, upstream, outcome).inc()
            metrics.live_streams.labels(kind).dec()
            metrics.duration.labels(kind, label, outcome).observe(now - self.started)
            for tokens, count in token_counts(usage):
                metrics.tokens.labels(label, upstream, tokens).inc(count)
        log_finished(log, self._kind, stream_id, self._model, outcome, started=self.started,
                     first_delta=self.first, now=now, deltas=self.deltas, nbytes=self.bytes, usage=usage,
                     attempts=attempts, client=client, status=status)
