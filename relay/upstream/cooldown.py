"""One upstream's cooldown: how long it is skipped after a failure, and when it is tried again.

After a failure the upstream is skipped until its ``Retry-After`` (or ``retry-after-ms``) when it
gave one, else for ``--cooldown`` seconds doubling with each failure in a row up to
``--cooldown-max``; 401/402/403 (its credentials or credit) for ``--down-time``.  When the time
is up one request tries it (half-open: ``probing``) while the others still go elsewhere; its
answer decides.  Another instance's cooldown (``heard``, through the shared store) applies here
too, bounded by the longest this instance would have chosen itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

from relay.config import Config
from relay.upstream.errors import DOWN_STATUSES, UpstreamError
from relay.upstream.metadata import Redactor

#: Longest cooldown an upstream's own ``Retry-After`` can ask for.
MAX_RETRY_AFTER: Final = 3600.0


@dataclass(slots=True)
class Health:
    """One upstream's cooldown state."""

    #: Failures in a row (a success resets it).
    failures: int = 0
    #: Clock time until which it is skipped; 0: never failed, or recovered.
    until: float = 0.0
    #: Why it is cooling down or down, for the operator (never the upstream's text).
    why: str = ""
    down: bool = False
    #: A request is trying it after its cooldown (half-open); the others go elsewhere meanwhile.
    probing: bool = False

    def usable(self, now: float) -> bool:
        if self.until == 0.0:
            return True
        return now >= self.until and not self.probing

    def state(self, now: float) -> str:
        if self.until == 0.0:
            return "ok"
        if now < self.until:
            return "down" if self.down else "cooling"
        return "probing" if self.probing else "recovering"

    def failed(self, exc: UpstreamError, now: float, config: Config, redact: Redactor) -> float:
        """A failure that fails over: start (or lengthen) the cooldown; its length in seconds."""
        self.probing = False
        self.failures += 1
        if exc.status in DOWN_STATUSES:
            self.down, wait = True, config.down_time
            self.why = f"HTTP {exc.status}: its credentials or credit were refused"
        else:
            self.down = False
            asked = retry_after(exc)
            wait = asked if asked is not None else min(config.cooldown * 2 ** (self.failures - 1), config.cooldown_max)
            self.why = f"HTTP {exc.status}" if exc.status is not None else redact.text(exc.message, 200)
        self.until = now + wait
        return wait

    def recovered(self) -> bool:
        """It answered: well again.  Whether it had been cooling down (or down)."""
        was = self.until != 0.0
        self.failures, self.until, self.why, self.down, self.probing = 0, 0.0, "", False, False
        return was

    def heard(self, wait: float, why: str, down: bool, now: float, config: Config, redact: Redactor) -> None:
        """Another instance started a cooldown of it (or saw it recover: ``wait`` 0)."""
        if wait <= 0:
            if self.until != 0.0 and not self.down:
                self.failures, self.until, self.why, self.probing = 0, 0.0, "", False
            return
        until = now + min(wait, max(config.cooldown_max, config.down_time))
        if until > self.until:
            self.until, self.why, self.down = until, redact.text(f"{why} (seen by another instance)", 240), down
            self.failures = max(self.failures, 1)


def retry_after(exc: UpstreamError) -> float | None:
    """The wait the upstream asked for: ``retry-after-ms``, else ``retry-after`` (seconds or a date)."""
    if exc.retry_after_ms is not None:
        return min(float(exc.retry_after_ms) / 1000, MAX_RETRY_AFTER)
    value = exc.retry_after
    if value is None:
        return None
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, min(when - time.time(), MAX_RETRY_AFTER))
