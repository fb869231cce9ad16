"""A handler's own crash is logged as the relay's bug, not as a client's malformed request.

aiohttp words both alike ("Error handling request from ..."); relay/http/client_errors.py folds
malformed requests into one INFO line per client per minute, so a crash must not reach it as one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient


def crashing(*_: Any, **__: Any) -> Any:
    raise RuntimeError("a bug of the relay's own (test)")


def errors_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_handler_that_raises_is_an_error_with_its_traceback_counted_and_answered_500(
        upstream: FakeUpstream, serve_relay: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from redis_server import free_port
    from test_metrics import scrape, value

    async def healthz(request: web.Request) -> web.Response:
        crashing()
        raise AssertionError

    monkeypatch.setattr("relay.http.app.healthz", healthz)
    metrics_port = free_port()
    async with serve_relay(rate_limit=0, metrics_listen=f"127.0.0.1:{metrics_port}") as port:
        caplog.set_level(logging.INFO)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-secret-token\r\n"
                     b"Connection: close\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 500 Internal Server Error"
        assert json.loads(body)["error"]["code"] == "internal"
        errors = errors_of(caplog)
        assert len(errors) == 1, caplog.text  # once: not again by aiohttp's own line
        assert errors[0].name == "relay.http" and "GET /healthz" in errors[0].getMessage()
        assert errors[0].exc_info is not None and "a bug of the relay's own" in str(errors[0].exc_info[1])
        assert "sk-secret-token" not in caplog.text
        assert not [r for r in caplog.records if "malformed" in r.getMessage()]
        samples = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "relay_handler_errors_total") == 1
        # A malformed request is still the client's: one INFO line, no traceback.
        caplog.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nthis is not a header\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await reader.read()).split(b"\r\n")[0].endswith(b" 400 Bad Request")
        writer.close()
        lines = [r for r in caplog.records if "malformed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None
        assert not errors_of(caplog)


async def test_a_crash_after_the_stream_began_ends_it_with_the_internal_error_event(
        upstream: FakeUpstream, make_relay: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def follow(*_: Any) -> bool:
        crashing()
        return True

    monkeypatch.setattr("relay.http.chat.follow", follow)
    relay = await make_relay()
    resp = await relay.post("/chat", json={"prompt": "hi"})
    assert resp.status == 200
    events = await SSEClient(resp).all()
    last = events[-1]
    assert (last["type"], last["code"], last["retriable"]) == ("error", "internal", True)
    errors = errors_of(caplog)
    assert len(errors) == 1 and "POST /chat" in errors[0].getMessage() and errors[0].exc_info is not None
