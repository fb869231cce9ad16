"""The one log line per finished generation, the same for ``/chat`` and ``/v1``.

Operators grep these for cost and latency: id, model, outcome, time to first delta, duration,
deltas and bytes sent, the upstream's token counts when it reported usage, the upstream that
answered (``upstream=``) and every attempt before it (``tried=name:outcome,...``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any


def log_finished(logger: logging.Logger, kind: str, stream_id: str, model: str, outcome: str, *,
                 started: float, first_delta: float | None, now: float, deltas: int, nbytes: int,
                 usage: dict[str, Any] | None, attempts: Sequence[str] = ()) -> None:
    ttft = f"{(first_delta - started) * 1000:.0f}ms" if first_delta is not None else "-"
    tokens = (f"{usage.get('prompt_tokens')}+{usage.get('completion_tokens')}"
              if usage and "prompt_tokens" in usage else "-")
    answered = attempts[-1].rpartition(":")[0] if attempts and attempts[-1].endswith(":ok") else "-"
    before = ",".join(attempts[:-1] if answered != "-" else attempts) or "-"
    logger.info("%s %s model=%s outcome=%s ttft=%s duration=%.0fms deltas=%d bytes=%d tokens=%s upstream=%s tried=%s",
                kind, stream_id, model, outcome, ttft, (now - started) * 1000, deltas, nbytes, tokens, answered,
                before)
