"""``relay serve --loop``: uvloop when asked for or installed (auto), asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

import pytest

from relay.run.cli import build_parser
from relay.run.server import loop_factory


def test_asyncio_means_the_default_loop() -> None:
    assert loop_factory("asyncio") is None


def test_auto_uses_uvloop_when_installed() -> None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        assert loop_factory("auto") is None
    else:
        assert loop_factory("auto") is uvloop.new_event_loop
        assert loop_factory("uvloop") is uvloop.new_event_loop


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> ModuleType:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, package)
    monkeypatch.setattr(importlib, "import_module", fake)


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    assert loop_factory("auto") is None


def test_asking_for_uvloop_without_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    with pytest.raises(SystemExit, match=r"uvloop is not installed.*\[uvloop\]"):
        loop_factory("uvloop")


def test_the_chosen_loop_runs_a_coroutine() -> None:
    factory = loop_factory("auto")

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(answer()) == 42


@pytest.mark.parametrize("value", ["auto", "asyncio", "uvloop"], ids=lambda v: f"--loop={v}")
def test_the_loop_flag_accepts_its_choices(value: str) -> None:
    assert build_parser().parse_args(["serve", "--loop", value]).loop == value


def test_an_unknown_loop_is_refused_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--loop", "trio"])
    assert exc.value.code == 2
    assert "--loop" in capsys.readouterr().err

