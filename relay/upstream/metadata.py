"""What of an upstream's answer may reach a client: every string redacted, every header checked.

An upstream (or a proxy in front of it) can echo the relay's key anywhere: in an error message,
the reason phrase, a request id, a ``retry-after``.  Every upstream-derived string that goes on
to a client or a log line passes ``Redactor``, which blanks every configured key in any letter
case; the headers the relay passes on are also checked for shape (``retry-after``: seconds or an
HTTP date; ``retry-after-ms``: a number; a request id: short and printable) and dropped when they
are not what they claim to be.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any, Final

REDACTED: Final = "[redacted]"
REQUEST_ID_HEADERS: Final = ("x-request-id", "request-id", "apim-request-id", "x-ms-request-id")
MAX_REQUEST_ID: Final = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID)
_SECONDS = re.compile(r"[0-9]{1,10}")
_MILLISECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")


class Redactor:
    """Blanks the relay's keys, in any letter case, wherever they appear in a string."""

    def __init__(self, keys: Iterable[str | None]) -> None:
        found = sorted({k for k in keys if k}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(k) for k in found), re.IGNORECASE) if found else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def hides(self, text: str) -> bool:
        """Whether ``text`` holds a key (a header value that does must not be passed at all)."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def text(self, text: str, limit: int = 500) -> str:
        """An upstream string for a client: keys blanked, control characters folded, bounded."""
        return _CONTROL.sub(" ", self(text))[:limit]


def request_id_of(headers: Any, redact: Redactor) -> str | None:
    """The upstream's request id, if it has the shape of one and holds no key."""
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            value = str(value)
            ok = _PRINTABLE_ID.fullmatch(value) is not None and not redact.hides(value)
            return value if ok else None
    return None


def _header(headers: Any, name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else str(value).strip()


def retry_after_of(headers: Any) -> str | None:
    """``retry-after`` when it is delay-seconds or an HTTP date (RFC 9110), else None."""
    value = _header(headers, "retry-after")
    if value is None:
        return None
    if _SECONDS.fullmatch(value):
        return value
    if len(value) <= 40 and value.isascii():
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return value
    return None


def retry_after_ms_of(headers: Any) -> str | None:
    """``retry-after-ms`` (OpenAI's, Azure's) when it is a non-negative number, else None."""
    value = _header(headers, "retry-after-ms")
    return value if value is not None and _MILLISECONDS.fullmatch(value) else None
