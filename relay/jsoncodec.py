"""The one JSON encoder: compact, UTF-8 as is.

``json.dumps`` with any non-default option builds a new encoder per call; every event, request
body and error object the relay writes goes through this one instead.
"""

from __future__ import annotations

import json
from typing import Any

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: Any) -> str:
    result: str = _encode(obj)
    return result

