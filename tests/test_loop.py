"""``relay serve --loop``: uvloop when asked for or installed (auto), asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

import pytest

from relay.run.flags import build_parser
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
    with pytest.raises(SystemExit, match=r"uvloop is not installed: .* -m pip install 'uvloop>=0.19'"):
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



def test_every_install_hint_names_what_setup_cfg_installs_for_that_extra() -> None:
    """A hint that names a distribution the index does not have ("llm-sse-relay[redis]") fails the
    user who copies it; the hints name the extras' own requirements, kept equal to setup.cfg's."""
    import configparser
    import sys
    from pathlib import Path

    from relay.extras import EXTRAS, install_hint

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    declared = {name: tuple(line.strip() for line in value.strip().splitlines() if line.strip())
                for name, value in cfg["options.extras_require"].items() if name != "test"}
    assert declared == EXTRAS
    for extra, requirements in EXTRAS.items():
        hint = install_hint(extra)
        assert hint.startswith(f"{sys.executable} -m pip install ") and all(r in hint for r in requirements)
        assert "llm-sse-relay" not in hint


def test_serve_help_is_grouped_by_concern_with_each_default_shown_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    titles = ["deployment:", "upstreams:", "limits and access:", "streams and resume:", "scale-out:",
              "observability:"]
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)  # in this order, each once
    assert "(default: None)" not in text and "(default: ())" not in text
    import re

    # One option per entry: no option's help carries two defaults.
    entries = re.split(r"\n  (?=-)", text)
    assert all(entry.count("(default:") <= 1 for entry in entries)
    web_root = next(e for e in entries if e.startswith("--web-root"))
    assert "installed with the package" in web_root
    log_level = next(e for e in entries if e.startswith("--log-level"))
    assert "(default: info)" in log_level
    # Every flag sits in a group under its concern, e.g. the proxy among the upstreams.
    upstreams = text[text.index("\nupstreams:\n"):text.index("\nlimits and access:\n")]
    assert "--upstream-proxy " in upstreams and "--connect-timeout" in upstreams
    assert "--redis local|URL" in text[text.index("\nscale-out:\n"):]
