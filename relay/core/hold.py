"""What a producer reads while its lease on the shared store may have lapsed, held until the store answers.

A producer stopped (SIGSTOP, a held loop) past its lease (``--owner-ttl``) may find that a reader
elsewhere has meanwhile ended its stream as ``interrupted``.  Nothing it reads from then goes to
its readers until the store confirms the stream is still its own: then what was held goes out in
order; if not, the store cancels the generation with the same ``interrupted`` the others got, and
what was held is dropped (relay/core/redis_writer.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay.core.store import Mirror
from relay.upstream.chunks import Chunk


class Hold:
    __slots__ = ("_chunks", "_release", "task")

    def __init__(self, mirror: Mirror, loop: asyncio.AbstractEventLoop,
                 release: Callable[[list[Chunk] | None], None]) -> None:
        self._chunks: list[Chunk] = []
        #: Called once the store answered: with what was held (the stream is still ours), or None.
        self._release = release
        #: The confirmation; the producer waits for it before its own end goes out.
        self.task = loop.create_task(self._confirm(mirror))

    def add(self, chunks: list[Chunk]) -> None:
        self._chunks.extend(chunks)

    async def _confirm(self, mirror: Mirror) -> None:
        ours = await mirror.confirm()
        self._release(self._chunks if ours else None)
