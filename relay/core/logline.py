"""The one log line per finished generation, the same for ``/chat`` and ``/v1``.

Operators grep these for cost and latency: id, model, outcome, time to first delta, duration,
deltas and bytes sent, the upstream's token counts when it reported usage, the upstream that
answered (``upstream=``) and every attempt before it (``tried=name:outcome,...``).  The same
facts go with the record as ``stream`` (``extra``), so ``--log-format json`` writes them as
fields (relay/logformat.py) rather than text to parse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any


def answered_upstream(attempts: Sequence[str]) -> str:
    """The upstream that answered (its attempt ended ``:ok``), else ``-``."""
    return attempts[-1].rpartition(":")[0] if attempts and attempts[-1].endswith(":ok") else "-"


def token_counts(usage: dict[str, Any] | None) -> Iterator[tuple[str, int]]:
    """``(type, count)`` for the prompt, completion and reasoning tokens an upstream's usage reports."""
    if not usage:
        return
    # Chat completions say prompt/completion, the Responses API input/output.
    for kind, key, other in (("prompt", "prompt_tokens", "input_tokens"),
                             ("completion", "completion_tokens", "output_tokens")):
        count = _count(usage.get(key)) or _count(usage.get(other))
        if count:
            yield kind, count
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    if isinstance(details, dict):
        count = _count(details.get("reasoning_tokens"))
        if count:
            yield "reasoning", count


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def log_finished(logger: logging.Logger, kind: str, stream_id: str, model: str, outcome: str, *,
                 started: float, first_delta: float | None, now: float, deltas: int, nbytes: int,
                 usage: dict[str, Any] | None, attempts: Sequence[str] = (), client: str | None = None,
                 status: int | None = None) -> None:
    ttft_ms = round((first_delta - started) * 1000) if first_delta is not None else None
    duration_ms = round((now - started) * 1000)
    tokens = (f"{usage.get('prompt_tokens')}+{usage.get('completion_tokens')}" if usage and "prompt_tokens" in usage
              else f"{usage.get('input_tokens')}+{usage.get('output_tokens')}" if usage and "input_tokens" in usage
              else "-")
    answered = answered_upstream(attempts)
    before = ",".join(attempts[:-1] if answered != "-" else attempts) or "-"
    fields: dict[str, Any] = {
        "id": stream_id, "endpoint": kind, "client": client, "model": model, "upstream": answered,
        "tried": before, "status": status, "outcome": outcome, "ttft_ms": ttft_ms, "duration_ms": duration_ms,
        "deltas": deltas, "bytes": nbytes, "tokens": dict(token_counts(usage)) or None,
    }
    logger.info("%s %s model=%s outcome=%s ttft=%s duration=%dms deltas=%d bytes=%d tokens=%s upstream=%s tried=%s",
                kind, stream_id, model, outcome, f"{ttft_ms}ms" if ttft_ms is not None else "-", duration_ms,
                deltas, nbytes, tokens, answered, before, extra={"stream": fields})
