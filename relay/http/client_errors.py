"""aiohttp's server log, with a client's malformed request turned into one concise line.

aiohttp logs every request it cannot parse at ERROR with a full traceback, whatever the log
level: 100 requests of 60 bytes wrote 55 KB.  A malformed request (aiohttp's parser raised an
``HttpProcessingError``) is the client's error, not the relay's, so here it is one line at INFO
naming the client and the problem, at most once per client per ``interval`` (with a count of what
was folded into it), so an attacker cannot fill the disk or the journal.  aiohttp logs a
handler's own failure with the same words: that is our bug, logged at ERROR with its traceback
and request by relay/http/crashes.py (so not again here), and anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http import HttpProcessingError

from relay.http.crashes import logged
from relay.logthrottle import INTERVAL, MAX_CLIENTS, OncePerClient

log = logging.getLogger("relay.http")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

class ClientErrorLog(logging.LoggerAdapter[logging.Logger]):
    """Give it to the server as its ``logger``."""

    def __init__(self, logger: logging.Logger, *, interval: float = INTERVAL, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, {})
        self._lines = OncePerClient(interval=interval, max_clients=max_clients, clock=clock)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("Error handling request"):
            exc = exc_info if isinstance(exc_info, BaseException) else None
            if isinstance(exc, HttpProcessingError):
                self.malformed(str(args[0]) if args else "unknown", exc)
                return
            if logged(exc):
                return  # a handler's crash, logged already with its request (relay/http/crashes.py)
            # Anything else under the same words is not the client's doing: our bug, in full.
        super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def malformed(self, client: str, exc: Any) -> None:
        folded = self._lines.due(client)
        if folded is None:
            return
        more = f" ({folded} more since the last line)" if folded else ""
        log.info("malformed request from %s: %s%s", client, describe(exc), more)


def describe(exc: Any) -> str:
    """The problem in a few words: the exception's type and first line, control characters folded."""
    if not isinstance(exc, BaseException):
        return "unreadable request"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return _CONTROL.sub(" ", f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:120]
