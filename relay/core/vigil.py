"""When nobody listens to a generation: the timer that stops it, and the check for readers elsewhere.

A generation is armed when its last client leaves (the resume grace; at once for ``/v1``) or
when a ``201`` stream waits for its first client; a client attaching disarms it.  When the timer
fires, the generation stops, unless a shared store (relay/core/store.py) says a reader on
another instance follows it: then it keeps reading for that reader and asks again every
``Mirror.recheck`` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from relay.core.store import Mirror

#: Checks in flight (a task must be referenced until it is done).
_checks: set[asyncio.Task[None]] = set()


def spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run a short check nobody awaits, kept referenced until it is done."""
    task = loop.create_task(coro)
    _checks.add(task)
    task.add_done_callback(_checks.discard)


class Watched(Protocol):
    """What the vigil asks of the generation it watches, and tells it."""

    finished: bool
    mirror: Mirror | None

    @property
    def subscribers(self) -> int: ...

    def heard_elsewhere(self) -> None:
        """A reader on another instance follows it: keep reading for that reader."""

    def unheard(self, why: str) -> None:
        """Nobody listens: stop."""


class Vigil:
    # It does not keep its generation (which keeps it): only an armed timer does, so a
    # generation let go is freed by reference counting, not left to the cyclic GC.
    __slots__ = ("_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, gen: Watched, delay: float, why: str) -> None:
        """Stop ``gen`` in ``delay`` seconds (saying ``why``) unless disarmed before."""
        self.disarm()
        self._timer = self._loop.call_later(delay, self._expire, gen, why)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, gen: Watched, why: str) -> None:
        self._timer = None
        if gen.mirror is None or gen.finished:
            gen.unheard(why)
            return
        spawn(self._loop, self._unless_listened(gen, gen.mirror, why))

    async def _unless_listened(self, gen: Watched, mirror: Mirror, why: str) -> None:
        listened = await mirror.listened()
        if gen.finished or gen.subscribers or self._timer is not None:
            return  # someone came back here meanwhile
        if listened:
            gen.heard_elsewhere()
            self.arm(gen, mirror.recheck, why)
        else:
            gen.unheard(why)
