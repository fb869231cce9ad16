"""The registry: the live and recently finished streams by id, the live-stream cap, expiry."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.config import Config
from relay.streams import Stream
from relay.upstream import UpstreamClient


class StreamLimit(Exception):
    """Too many live streams; the message is for the client."""


class Registry:
    """The live and recently finished streams, by id."""

    def __init__(self, config: Config, upstream: UpstreamClient, *, demo: bool, default_model: str | None) -> None:
        self.config = config
        self.upstream = upstream
        self.demo = demo
        self.default_model = default_model
        self._streams: dict[str, Stream] = {}
        self.live = 0
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def create(self, *, model: str, body: dict[str, Any], wait_for_subscriber: float | None = None) -> Stream:
        if self.live >= self.config.max_streams:
            raise StreamLimit(f"the relay is at its limit of {self.config.max_streams} live streams; try again shortly")
        stream = Stream(self, model=model, demo=self.demo, body=body, wait_for_subscriber=wait_for_subscriber)
        self._streams[stream.id] = stream
        self.live += 1
        return stream

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def finished(self, stream: Stream) -> None:
        self.live -= 1
        loop = asyncio.get_running_loop()
        self._expiry[stream.id] = loop.call_later(self.config.stream_ttl, self._expire, stream.id)

    def _expire(self, stream_id: str) -> None:
        self._expiry.pop(stream_id, None)
        self._streams.pop(stream_id, None)

    def running(self) -> list[Stream]:
        return [s for s in self._streams.values() if not s.finished]

    async def close(self, code: str = "shutdown", message: str = "the relay is shutting down") -> None:
        """Cancel every running stream with ``code`` and wait for the producers to finish."""
        tasks = []
        for stream in self.running():
            stream.cancel(code, message)
            tasks.append(stream.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
