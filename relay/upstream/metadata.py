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


#: The shortest piece of a key that is blanked on its own: an upstream that quotes part of the key
#: (``sk-proj-abc...xyz1``, as OpenAI's 401 does) must not leak it piece by piece either.
FRAGMENT: Final = 8
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Redactor:
    """Blanks the relay's keys, in any letter case, wherever they appear in a string.

    Two strengths.  Everything an upstream says that the relay quotes (error texts, reason
    phrases, header values, the health reason) loses every run of ``FRAGMENT`` or more
    characters of any key (``__call__``, ``text``, ``hides``).  A streamed chunk, checked on the
    hot path, loses every whole key (``chunk``): one case-blind search, about a microsecond.
    """

    def __init__(self, keys: Iterable[str | None]) -> None:
        found = sorted({k for k in keys if k}, key=len, reverse=True)
        self._whole = re.compile("|".join(re.escape(k) for k in found), re.IGNORECASE) if found else None
        self._whole_bytes = (re.compile(b"|".join(re.escape(k.encode()) for k in found), re.IGNORECASE)
                             if found else None)
        self._lowered = tuple({k.lower() for k in found})
        self._grams = frozenset(k.translate(_ASCII_LOWER)[i:i + FRAGMENT]
                                for k in found for i in range(len(k) - FRAGMENT + 1))

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where pieces of a key sit in ``text``: overlapping and adjacent windows merged."""
        spans: list[tuple[int, int]] = []
        if self._whole is not None:
            spans.extend(m.span() for m in self._whole.finditer(text))
        grams = self._grams
        if grams and len(text) >= FRAGMENT:
            low = text.translate(_ASCII_LOWER)  # ASCII only: the length (and every index) stays
            spans.extend((i, i + FRAGMENT) for i in range(len(low) - FRAGMENT + 1) if low[i:i + FRAGMENT] in grams)
        if len(spans) < 2:
            return spans
        spans.sort()
        merged = [spans[0]]
        for start, end in spans[1:]:
            last_start, last_end = merged[-1]
            if start <= last_end:
                merged[-1] = (last_start, max(last_end, end))
            else:
                merged.append((start, end))
        return merged

    def __call__(self, text: str) -> str:
        spans = self._spans(text)
        if not spans:
            return text
        out: list[str] = []
        pos = 0
        for start, end in spans:
            out.append(text[pos:start])
            out.append(REDACTED)
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def hides(self, text: str) -> bool:
        """Whether ``text`` holds a key or a piece of one (such a header value is not passed at all)."""
        return bool(self._spans(text))

    def text(self, text: str, limit: int = 500) -> str:
        """An upstream string for a client or a log line: keys blanked, control characters folded, bounded."""
        return _CONTROL.sub(" ", self(text))[:limit]

    def chunk(self, data: str) -> str:
        """A streamed chunk with every whole key blanked (the hot path's check: a lowered copy and a
        substring test, 0.2 us for a typical chunk, where a case-blind regex search takes 2 us)."""
        if not self._lowered:
            return data
        low = data.lower()
        if not any(key in low for key in self._lowered):
            return data
        assert self._whole is not None
        return self._whole.sub(REDACTED, data)

    def body(self, data: bytes) -> bytes:
        """A whole answer's bytes with every whole key blanked (the bytes are otherwise kept as sent)."""
        whole = self._whole_bytes
        if whole is None or whole.search(data) is None:
            return data
        return whole.sub(REDACTED.encode(), data)


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
