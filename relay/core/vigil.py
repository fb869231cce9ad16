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
    #: The armed timer, or None.  The generation holds it (one slot, not an object per
    #: generation: thousands are alive at once); only this module sets it.
    vigil: asyncio.TimerHandle | None

    @property
    def subscribers(self) -> int: ...

    def heard_elsewhere(self) -> None:
        """A reader on another instance follows it: keep reading for that reader."""

    def unheard(self, why: str) -> None:
        """Nobody listens: stop."""


def arm(gen: Watched, delay: float, why: str) -> None:
    """Stop ``gen`` in ``delay`` seconds (saying ``why``) unless disarmed before."""
    disarm(gen)
    gen.vigil = asyncio.get_running_loop().call_later(delay, _expire, gen, why)


def disarm(gen: Watched) -> None:
    if gen.vigil is not None:
        gen.vigil.cancel()
        gen.vigil = None


def _expire(gen: Watched, why: str) -> None:
    gen.vigil = None
    if gen.mirror is None or gen.finished:
        gen.unheard(why)
        return
    spawn(asyncio.get_running_loop(), _unless_listened(gen, gen.mirror, why))


async def _unless_listened(gen: Watched, mirror: Mirror, why: str) -> None:
    listened = await mirror.listened()
    if gen.finished or gen.subscribers or gen.vigil is not None:
        return  # someone came back here meanwhile
    if listened:
        gen.heard_elsewhere()
        arm(gen, mirror.recheck, why)
    else:
        gen.unheard(why)
