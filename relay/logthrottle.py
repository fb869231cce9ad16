"""At most one log line per client per interval: what a client can make the relay log, it cannot
make the relay log without bound (malformed requests, refused connections, slow headers).

Below relay/http and relay/run, which both use it."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

INTERVAL: Final = 60.0
MAX_CLIENTS: Final = 10_000


class OncePerClient:
    """At most one line per client per ``interval``, with a count of what was folded into it."""

    def __init__(self, *, interval: float = INTERVAL, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._max_clients = max_clients
        self._clock = clock
        #: client → (when its last line was written, events folded since)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def due(self, client: str) -> int | None:
        """None: fold this one into the next line; else write a line now (the count folded before)."""
        now = self._clock()
        last, folded = self._seen.pop(client, (None, 0))
        if last is not None and now - last < self._interval:
            self._seen[client] = (last, folded + 1)
            return None
        self._seen[client] = (now, 0)
        while len(self._seen) > self._max_clients:
            self._seen.popitem(last=False)
        return folded
