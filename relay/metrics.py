"""What an operator scrapes: the relay's Prometheus metrics (``--metrics-listen``).

Built on ``prometheus-client`` (the optional ``metrics`` extra), one ``Metrics`` per app with a
registry of its own.  The code that sees a thing counts it; this module only names the
collectors, so their names, units, labels and buckets are in one place.  Where the OpenTelemetry
GenAI semantic conventions name the same measurement, the help text says which.

Labels stay bounded, so a client cannot mint series: ``endpoint`` is ``chat`` or ``v1``;
``model`` only a configured model name, else ``other`` (``model_label``); ``upstream`` a
configured upstream's name (``-``: none answered); ``outcome`` ``done`` or one of the relay's
own error codes; ``status`` an HTTP status.  Never a stream id, token, prompt or address.

Under ``--workers`` each worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (the
library's multiprocess mode, chosen when it is imported, so the supervisor sets it in the
workers' environment) and the supervisor's listener merges them; gauges say how the workers'
values combine (``livesum``: the sum over workers alive).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Where the library's multiprocess mode keeps each process's values (set for workers only).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: Set in a worker's environment when its supervisor serves the metrics of every worker.
SUPERVISED_ENV: Final = "RELAY_METRICS_SUPERVISED"

#: Time to first token: a model may think for minutes before its first token.
TTFT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
                       60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
#: Between two chunks of one answer: milliseconds for a fast model, seconds for a slow tool call.
GAP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0)
#: A whole stream, up to the total timeout (added to the buckets when it is longer).
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
                           600.0, 900.0, 1200.0, 1800.0)
LAG_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5)
#: How often the loop-lag probe and the upstream-state gauges are sampled.
SAMPLE_INTERVAL: Final = 1.0

OTHER: Final = "other"


class Metrics:
    """The collectors; ``model_label`` and ``models`` keep the ``model`` label bounded."""

    def __init__(self, *, total_timeout: float = 1800.0) -> None:
        r = self.registry = CollectorRegistry()
        #: The listener's URL once it listens (None in a worker: its supervisor serves them).
        self.url: str | None = None
        #: Configured model names (the default, --allow-model, [[upstreams]] models): the only
        #: values the ``model`` label takes besides ``other``.
        self.models: frozenset[str] = frozenset()
        endpoint_model = ["endpoint", "model"]
        self.started = Counter("relay_generations_started", "Generations started (requests sent upstream).",
                               endpoint_model, registry=r)
        self.finished = Counter(
            "relay_generations_finished", "Generations finished, by outcome: done, or the error code it ended with "
            "(cancelled: its clients left; upstream_error, upstream_timeout, shutdown, ...).",
            ["endpoint", "model", "upstream", "outcome"], registry=r)
        self.live_streams = Gauge("relay_streams_live", "Generations running now.", ["endpoint"],
                                  multiprocess_mode="livesum", registry=r)
        self.live_subscribers = Gauge("relay_subscribers_live", "Clients reading a generation now.", ["endpoint"],
                                      multiprocess_mode="livesum", registry=r)
        self.ttft = Histogram(
            "relay_time_to_first_token_seconds", "Seconds from the request to the first chunk with content "
            "(OpenTelemetry GenAI: gen_ai.client.operation.time_to_first_chunk).",
            ["endpoint", "model", "upstream"], buckets=TTFT_BUCKETS, registry=r)
        self.chunk_gap = Histogram(
            "relay_time_between_chunks_seconds", "Seconds between two content chunks of one answer "
            "(OpenTelemetry GenAI: gen_ai.client.operation.time_per_output_chunk).",
            endpoint_model, buckets=GAP_BUCKETS, registry=r)
        durations = tuple(sorted({*DURATION_BUCKETS, float(total_timeout)}))
        self.duration = Histogram(
            "relay_stream_duration_seconds", "Seconds from the request to the generation's end, by outcome "
            "(OpenTelemetry GenAI: gen_ai.client.operation.duration).",
            ["endpoint", "model", "outcome"], buckets=durations, registry=r)
        self.tokens = Counter(
            "relay_tokens", "Tokens the upstream reported in its usage, by type: prompt, completion, reasoning "
            "(a part of completion) (OpenTelemetry GenAI: gen_ai.client.token.usage, gen_ai.token.type "
            "input/output).", ["model", "upstream", "type"], registry=r)
        self.upstream_requests = Counter(
            "relay_upstream_requests", "Requests sent to each upstream, by the HTTP status it answered "
            "(none: no answer; the error code says why is in relay_upstream_timeouts_total and the logs).",
            ["upstream", "status"], registry=r)
        self.upstream_timeouts = Counter(
            "relay_upstream_timeouts", "Upstream deadlines that passed, by phase: connect, first_token, idle, total.",
            ["upstream", "phase"], registry=r)
        self.failovers = Counter(
            "relay_upstream_failovers", "Attempts given up on this upstream before the answer's first byte (the "
            "request went on to the next upstream, if any was left).", ["upstream"], registry=r)
        self.upstream_available = Gauge(
            "relay_upstream_available", "1 while the upstream is not cooling down or down, else 0.", ["upstream"],
            multiprocess_mode="livemin", registry=r)
        self.disconnects = Counter(
            "relay_client_disconnects", "Clients that left a generation before its end (including those cut).",
            ["endpoint"], registry=r)
        self.unheard = Counter(
            "relay_upstream_closed_unheard", "Upstream connections closed because nobody listened any more (every "
            "client left, past the resume grace).", ["endpoint"], registry=r)
        self.unrelayed = Counter(
            "relay_events_unrelayed", "Events read from the upstream after the last client left, that no client got "
            "before the upstream was closed for nobody listening.", ["endpoint"], registry=r)
        self.resumes = Counter(
            "relay_resumes", "GET /chat/{id} with a Last-Event-ID, by result: replayed, no_content (204: it had "
            "the end), not_found (404), resume_expired, store_incomplete, store_unavailable.", ["result"],
            registry=r)
        self.keepalives = Counter("relay_keepalives_sent", "Keepalive comments sent to silent streams.", registry=r)
        self.cut = Counter(
            "relay_clients_cut", "Streaming clients cut off, by reason: send_timeout (its send buffer stayed full "
            "for --send-timeout), fell_behind (more than four replay logs behind).", ["reason"], registry=r)
        self.refused = Counter(
            "relay_requests_refused", "Requests refused before anything was sent upstream, by reason: auth, "
            "origin, host, rate_limit, stream_limit, client_streams, size, timeout, method, invalid.", ["reason"],
            registry=r)
        self.deadlines_missed = Counter(
            "relay_connection_deadlines_missed", "Connections closed for a request head that did not arrive within "
            "--header-timeout (408).", ["deadline"], registry=r)
        self.connections_refused = Counter(
            "relay_connections_refused", "Connections closed at accept, by limit: per_client "
            "(--max-connections-per-client), total (--max-connections).", ["limit"], registry=r)
        self.loop_lag = Histogram(
            "relay_event_loop_lag_seconds", "How late the event loop ran a timer (sampled each second): time every "
            "stream waits for.", buckets=LAG_BUCKETS, registry=r)
        self.redis_round_trip = Histogram(
            "relay_redis_round_trip_seconds", "Seconds per Redis round trip, by operation: write (a batch of events), "
            "refresh (owner keys and leases).", ["op"], buckets=REDIS_BUCKETS, registry=r)
        self.redis_errors = Counter("relay_redis_errors", "Redis round trips that failed, by operation.", ["op"],
                                    registry=r)
        self.handler_errors = Counter("relay_handler_errors", "Requests whose handler failed: a bug of the relay's "
                                      "(each logged at ERROR with its traceback).", registry=r)

    def model_label(self, model: str) -> str:
        """``model`` if it is a configured name, else ``other``: a client cannot add series."""
        return model if model in self.models else OTHER

    async def sample(self, upstreams: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        """Until cancelled: each second, how late the loop woke us, and each upstream's availability."""
        loop = asyncio.get_running_loop()
        while True:
            for name, available in upstreams():
                self.upstream_available.labels(name).set(1 if available else 0)
            due = loop.time() + SAMPLE_INTERVAL
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.loop_lag.observe(max(0.0, loop.time() - due))


def supervised() -> bool:
    """This process is a worker whose supervisor serves the metrics (from the shared value files)."""
    return bool(os.environ.get(SUPERVISED_ENV)) and bool(os.environ.get(MULTIPROC_ENV))
