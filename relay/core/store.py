"""Where a stream can be found beyond the process that produces it: the store interface.

The memory store (the default) is this module's ``Store``: every stream lives only in its
generation's own log, so there is nothing to share and every method says so.  The Redis store
(relay/core/redis_store.py) copies each ``/chat`` generation's events to Redis for readers on
other workers and instances, carries presence and cancels between them, and holds the per-client
limits for all of them.  The core and the views talk to this interface only, so they do not
know which store is in use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.core.generation import Generation
    from relay.core.registry import Registry
    from relay.metrics import Metrics
    from relay.upstream.pool import Pool


class StoreUnavailable(Exception):
    """The shared store cannot be reached now; the message names the cause for the client."""


class Mirror(Protocol):
    """A generation's copy in the shared store: told every event, asked about listeners elsewhere."""

    #: Seconds between checks for a listener elsewhere while nobody here reads.
    recheck: float

    def append(self, seq: int, data: bytes, last: bool) -> None:
        """Queue one event for the shared log (never waits)."""

    async def listened(self) -> bool:
        """Whether a reader on another instance follows the stream now."""

    def leased(self) -> bool:
        """Whether the producer surely still owns the stream (its lease cannot have lapsed)."""

    async def confirm(self) -> bool:
        """After the lease may have lapsed: whether the stream is still this producer's (bounded)."""


@dataclass(frozen=True, slots=True)
class Remote:
    """A stream found in the shared store (its producer may be elsewhere, or gone)."""

    id: str
    #: The access token digest that started it (relay/http/access.py); None without tokens.
    owner: str | None
    #: The sequence number of its terminal event, once it has one.
    end: int | None
    #: Its log in the store is incomplete (the store was lost or overflowed while it ran).
    unreplayable: bool = False
    #: Its end was appended because its producer was gone (relay/http/chat_wire.py).
    interrupted: bool = False
    #: The view that made it (a generation's ``kind``): each view serves only its own.
    kind: str = "chat"


class SharedLimits(Protocol):
    """The shared store's side of the limits (relay/http/ratelimit.py asks; relay/core/redis_store.py answers); None answers: it is away."""

    async def take(self, identity: str, per_minute: int) -> float | None: ...

    async def acquire(self, identity: str, per_client: int) -> tuple[str | None, int] | None: ...

    def release(self, lease: str) -> None: ...


class Store:
    """The memory store: nothing leaves the process."""

    shared = False

    async def start(self) -> None:
        """Connect and check; raise SystemExit with one line when the store cannot be used."""

    def attach(self, registry: Registry, metrics: Metrics | None, pool: Pool) -> None:
        """The process's generations, metrics and upstreams, for what the store shares of them."""

    def limits(self) -> SharedLimits | None:
        """Per-client limits that hold across instances, or None: each process counts its own."""
        return None

    def health(self) -> dict[str, object] | None:
        """The store's state for /healthz (None: nothing to report)."""
        return None

    async def signing_secret(self) -> bytes | None:
        """The events-URL secret every instance shares, or None when each process has its own."""
        return None

    async def close(self) -> None:
        """Write what is queued (bounded) and disconnect."""

    def mirror(self, gen: Generation) -> Mirror | None:
        """The shared copy of a resumable generation, or None when nothing is shared."""
        return None

    async def ready(self, stream_id: str) -> None:
        """Return once a new stream can be found by other instances (its first write is out)."""

    async def lookup(self, stream_id: str) -> Remote | None:
        """A stream that is not in this process; None when the store does not know it."""
        return None

    async def events(self, remote: Remote) -> list[bytes]:
        """Every event of the stream's shared log now, without waiting for more."""
        raise StoreUnavailable("no shared store is configured")

    def follow(self, remote: Remote, pos: int, interrupted: bytes) -> AsyncIterator[bytes]:
        """The stream's events from ``pos`` on, until its terminal event, while counting as a listener.

        ``interrupted`` is the terminal event to append should the producer turn out to be gone.  Raises ``ResumeExpired`` when ``pos`` has
        left the shared log, ``StoreUnavailable`` when the store is lost.
        """
        raise StoreUnavailable("no shared store is configured")

    async def cancel(self, stream_id: str) -> None:
        """Ask whichever instance produces the stream to stop it."""

    def keep_input(self, stream_id: str, data: bytes) -> None:
        """Keep a background response's input (JSON) beside its copy, for readers elsewhere (never waits)."""

    async def input_of(self, stream_id: str) -> bytes | None:
        """A background response's input kept by ``keep_input`` on any instance; None when unknown."""
        raise StoreUnavailable("no shared store is configured")
