"""deploy/relay.service and relay.socket: systemd accepts them, the hardening holds, the numbers agree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from relay.config import Config
from relay.run.server import HANDLER_GRACE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SHIPPED_EXEC = "/opt/relay/bin/relay serve"


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The shipped units, with ExecStart pointed at this interpreter (verify checks the binary exists)."""
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    service = (DEPLOY / "relay.service").read_text()
    assert service.count(SHIPPED_EXEC) == 1
    (tmp_path / "relay.service").write_text(service.replace(SHIPPED_EXEC, f"{sys.executable} -m relay serve"))
    shutil.copy(DEPLOY / "relay.socket", tmp_path / "relay.socket")
    return tmp_path


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_units_pass_systemd_analyze_verify(units: Path) -> None:
    result = analyze("verify", "--man=no", "./relay.service", "./relay.socket", cwd=units)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_service_exposure_score_is_below_2(units: Path) -> None:
    result = analyze("security", "--offline=yes", "./relay.service", cwd=units)
    match = re.search(r"Overall exposure level for relay\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) < 2.0, result.stdout


def test_stop_timeout_covers_the_drain_and_the_last_events() -> None:
    service = directives("relay.service")
    exec_start = service["ExecStart"][0]
    drain = re.search(r"--drain-timeout (\S+)", exec_start)
    drain_timeout = float(drain[1]) if drain else Config().drain_timeout
    assert seconds(service["TimeoutStopSec"][0]) > drain_timeout + HANDLER_GRACE


def test_service_is_notify_with_watchdog_credential_and_room_for_thousands_of_streams() -> None:
    service = directives("relay.service")
    assert service["Type"] == ["notify"]
    assert seconds(service["WatchdogSec"][0]) > 0
    assert service["LoadCredential"] == ["openai-api-key:/etc/relay/openai-api-key"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["DynamicUser"] == ["yes"] and service["ProtectSystem"] == ["strict"]


def test_socket_has_a_backlog_for_bursts_and_one_process_accepting() -> None:
    socket_unit = directives("relay.socket")
    assert int(socket_unit["Backlog"][0]) >= 4096
    assert socket_unit["Accept"] == ["no"]
    assert socket_unit["ListenStream"] == ["127.0.0.1:8080"]
