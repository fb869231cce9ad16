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


def test_bad_metrics_and_log_settings_are_one_line_and_exit_status_2(tmp_path: Path) -> None:
    import os

    script = Path(sys.executable).parent / "relay"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    cases = [(["--metrics-listen", "somewhere:9100"], {}, "--metrics-listen"),
             (["--metrics-listen", "127.0.0.1:8080", "--port", "8080"], {}, "never the public port"),
             ([], {"RELAY_LOG_FORMAT": "xml"}, "--log-format"),
             ([], {"RELAY_METRICS_LISTEN": "127.0.0.1:99999"}, "--metrics-listen")]
    for args, extra, named in cases:
        done = subprocess.run([str(script), "serve", *args], capture_output=True, text=True, timeout=60,
                              env={**env, **extra})
        assert done.returncode == 2, (args, extra, done.stderr)
        assert done.stderr.strip().count("\n") == 0 and named in done.stderr, done.stderr


def test_metrics_without_prometheus_client_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    # A site directory that hides the library: the optional extra missing, as on a plain install.
    hide = tmp_path / "hide"
    hide.mkdir()
    # None in sys.modules is how Python marks a module as unimportable (find_spec answers None).
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['prometheus_client'] = None\n")
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}, "PYTHONPATH": str(hide)}
    done = subprocess.run([sys.executable, "-m", "relay", "serve", "--metrics-listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert f"{sys.executable} -m pip install 'prometheus-client>=0.22'" in done.stderr
