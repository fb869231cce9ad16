"""The one log line per finished generation, the same for ``/chat`` and ``/v1``.

Operators grep these for cost and latency: id, model, outcome, time to first delta, duration,
deltas and bytes sent, and the upstream's token counts when it reported usage.
"""

from __future__ import annotations

import logging
from typing import Any


def log_finished(logger: logging.Logger, kind: str, stream_id: str, model: str, outcome: str, *,
                 started: float, first_delta: float | None, now: float, deltas: int, nbytes: int,
                 usage: dict[str, Any] | None) -> None:
    ttft = f"{(first_delta - started) * 1000:.0f}ms" if first_delta is not None else "-"
    tokens = (f"{usage.get('prompt_tokens')}+{usage.get('completion_tokens')}"
              if usage and "prompt_tokens" in usage else "-")
    logger.info("%s %s model=%s outcome=%s ttft=%s duration=%.0fms deltas=%d bytes=%d tokens=%s",
                kind, stream_id, model, outcome, ttft, (now - started) * 1000, deltas, nbytes, tokens)
