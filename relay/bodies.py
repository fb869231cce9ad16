"""Reading a body up to a bound, for the client's request (relay/http/body.py) and the upstream's
answers (relay/upstream/client.py) alike: it sits below both so neither imports the other."""

from __future__ import annotations

import aiohttp


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes of a body, to its end (``read(n)`` alone stops at the first packet)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        data = await content.read(limit - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)
