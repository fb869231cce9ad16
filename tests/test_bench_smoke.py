"""bench/run.py --quick end to end: every figure is produced and every stream's bytes were right.

No timing thresholds here: the figures depend on the machine; this only pins that the harness
works (processes start, streams are checked, the JSON has every figure).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import require
from procs import run_bench
from bench.procs import nginx_binary


FIGURES = (
    "relay chat CPU per event", "relay v1 CPU per event", "relay chat sustained events/s",
    "relay v1 sustained events/s", "added TTFT p50 chat", "added TTFT p99 v1",
    "disconnect → upstream close p99 chat", "disconnect → upstream close p99 v1",
    "RSS per open stream chat", "RSS per open stream v1", "most concurrent streams",
    "first byte while upstream silent p50", "failover added TTFT p50", "stalled readers: healthy TTFT p50",
    "redis store: added TTFT p50", "redis store: round trips per relayed event", "--workers 1: sustained",
    "--workers 2: sustained", "soak: streams byte-exact", "soak: tasks after / baseline",
    "relay v1 CPU per event unsaturated / nginx", "remote seq-20: new upstream connections per answer, relay",
    "remote conc-20: added TTFT p50 over direct, relay",
)


def test_the_quick_benchmark_produces_every_figure_with_every_stream_checked(tmp_path: Path) -> None:
    require(nginx_binary() is not None, "nginx is not installed")
    require(shutil.which("redis-server") is not None, "redis-server is not installed (the redis and workers phases)")
    report = run_bench("--quick", "--workers-max", "2", out=tmp_path, timeout=240)
    assert report["content_ok"] is True
    assert report["checks"] and all(c["errors"] == 0 and c["ok"] == c["streams"] for c in report["checks"])
    names = [row["figure"] for row in report["figures"]]
    for wanted in FIGURES:
        assert any(name.startswith(wanted) for name in names), wanted
    for row in report["figures"]:
        assert row["value"] is not None, row
    assert "relay chat CPU / nginx" in names and "nginx CPU per event" in names
