"""A short soak (the benchmark's soak phase, quick): 500 streams through a relay process, 50 at a
time, each replaced when it ends.  Every stream must be byte-exact, and once they are over the
relay's open files and tasks must be back to the baseline taken before them: a descriptor or a
task left behind per stream shows here as hundreds.  No memory threshold: RSS is the full soak's
figure (bench/RESULTS.md), not a test's.
"""

from __future__ import annotations

from pathlib import Path

from procs import run_bench


def test_a_soak_of_500_streams_is_byte_exact_and_leaves_no_descriptor_or_task_behind(tmp_path: Path) -> None:
    report = run_bench("--quick", "--only", "soak", "--no-nginx", out=tmp_path, timeout=120)
    soak = report["results"]["soak"]["chat"]
    assert soak["streams"] == 500 and soak["ok"] == 500 and soak["errors"] == 0, soak["error_samples"]
    assert soak["events"] == 500 * 10
    # It was a soak: the samples saw 50 streams open at once, and the tasks and files they cost.
    assert max(s["live_streams"] for s in soak["samples"]) == 50
    base, after = soak["baseline"], soak["after"]
    assert max(s["open_files"] for s in soak["samples"]) >= base["open_files"] + 50
    assert max(s["tasks"] for s in soak["samples"]) >= base["tasks"] + 50
    assert after["open_files"] <= base["open_files"], (base, after)
    assert after["tasks"] <= base["tasks"], (base, after)
    assert after["live_streams"] == 0
