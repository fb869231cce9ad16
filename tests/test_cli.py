"""The ``relay`` command itself, as installed (the README's commands run it, not ``python -m relay``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_installed_relay_command_runs() -> None:
    script = Path(sys.executable).parent / "relay"
    assert script.exists(), f"{script} is not installed (pip install -e .)"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("relay ")


def test_bad_flags_are_one_line_and_exit_status_2() -> None:
    script = Path(sys.executable).parent / "relay"
    done = subprocess.run([str(script), "serve", "--port", "99999"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--port" in done.stderr
