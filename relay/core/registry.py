"""The registry: every generation in flight, the live cap, retention of finished ones, the end.

One registry for both endpoints, so ``--max-streams`` counts every generation, the drain waits
for every one and ``/healthz`` reports them all.  Only resumable generations (``/chat``) can be
found by id; they are kept after they finish for ``--stream-ttl`` and within
``--retention-bytes`` for all finished logs together (the oldest go first), so a burst of short
streams cannot hold every log for the whole TTL.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.core.generation import Generation
from relay.core.store import Store
from relay.core.wire import Wire
from relay.upstream.pool import Pool

if TYPE_CHECKING:
    from relay.metrics import Metrics


class StreamLimit(Exception):
    """Too many live generations; the message is for the client."""


class Registry:
    def __init__(self, config: Config, upstream: Pool, store: Store | None = None,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._upstream = upstream
        self.store = store if store is not None else Store()
        self._live: set[Generation] = set()
        self._by_id: dict[str, Generation] = {}
        #: Finished resumable generations, oldest first: id → (log bytes, expiry timer).
        self._kept: OrderedDict[str, tuple[int, asyncio.TimerHandle]] = OrderedDict()
        self.kept_bytes = 0
        self.closed = False

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def kept(self) -> int:
        """Finished generations still kept for resume."""
        return len(self._kept)

    def __len__(self) -> int:
        """Generations that can be found by id (running or kept)."""
        return len(self._by_id)

    def create(self, *, kind: str, model: str, body: dict[str, Any], wire: Wire, resumable: bool = True,
               streaming: bool = True, wait_for_subscriber: float | None = None,
               owner: str | None = None, background: bool = False) -> Generation:
        """Register and start a generation, or raise StreamLimit at the cap."""
        if self.closed:
            raise StreamLimit("the relay is shutting down; try again shortly")
        if len(self._live) >= self._config.max_streams:
            raise StreamLimit(f"the relay is at its limit of {self._config.max_streams} live streams; "
                              "try again shortly")
        gen = Generation(kind=kind, config=self._config, upstream=self._upstream, wire=wire, model=model,
                         body=body, on_finished=self._finished, resumable=resumable, streaming=streaming,
                         metrics=self._metrics, background=background)
        gen.owner = owner
        self._live.add(gen)
        if resumable:
            self._by_id[gen.id] = gen
            gen.mirror = self.store.mirror(gen)
        gen.start(wait_for_subscriber)
        return gen

    def get(self, stream_id: str) -> Generation | None:
        """A resumable generation by id (running, or finished and still kept)."""
        return self._by_id.get(stream_id)

    def running(self) -> list[Generation]:
        return list(self._live)

    def _finished(self, gen: Generation) -> None:
        self._live.discard(gen)
        if not gen.resumable or self.closed:
            self._by_id.pop(gen.id, None)
            return
        timer = asyncio.get_running_loop().call_later(self._config.stream_ttl, self._forget, gen.id)
        self._kept[gen.id] = (gen.log_bytes, timer)
        self.kept_bytes += gen.log_bytes
        budget = self._config.retention_bytes
        while self.kept_bytes > budget and self._kept:
            self._forget(next(iter(self._kept)))

    def _forget(self, stream_id: str) -> None:
        kept = self._kept.pop(stream_id, None)
        if kept is not None:
            nbytes, timer = kept
            timer.cancel()
            self.kept_bytes -= nbytes
        self._by_id.pop(stream_id, None)

    async def close(self, code: str = "shutdown",
                    message: str = "the relay is restarting; send the request again") -> None:
        """The end: refuse new generations, cancel every running one with ``code`` and wait for them."""
        self.closed = True
        tasks = []
        for gen in list(self._live):
            gen.cancel(code, message)
            if gen.task is not None:
                tasks.append(gen.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream_id in list(self._kept):
            self._forget(stream_id)
        self._by_id.clear()
