"""``--log-format text|json``: one line per record, for a person or for a machine.

Text is the default, for a terminal and journald (which adds its own time stamps, but a terminal
does not).  JSON writes one object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, ``worker`` under ``--workers``, and for a finished stream its fields (id, endpoint,
client, model, upstream, status, outcome, ttft_ms, duration_ms, tokens, bytes: see
relay/core/logline.py), so a log pipeline filters on fields instead of parsing text.  What goes
in a message is the same in both formats, and no message ever holds a key, a token or a prompt.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

#: The record attribute that carries a stream's fields (``extra={"stream": {...}}``).
STREAM_FIELDS = "stream"


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = int(self._worker) if self._worker.isdigit() else self._worker
        fields = getattr(record, STREAM_FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if value is not None:
                    out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


def setup_logging(level: str, fmt: str, worker: str | None = None) -> None:
    """Configure the root logger on stderr in ``fmt`` (``text`` or ``json``), unless it already has a
    handler (as ``logging.basicConfig`` does: a host program's or a test's logging stays as it is)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = f" [worker {worker}]" if worker else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
