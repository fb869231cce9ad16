"""What a connection may cost before and between requests: idle keep-alive connections are closed
after --keepalive-idle, and the process raises its open-file limit and says how close it is."""

from __future__ import annotations

import asyncio
import json
import resource
from pathlib import Path
from typing import Any

from conftest import TEST_KEY, FakeUpstream
from procs import listening_socket, spawn_relay
from relay.config import Config
from relay.run.server import start


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_idle(upstream: FakeUpstream) -> None:
    runner, _ = await start(Config(upstream=upstream.base_url, api_key=TEST_KEY, model="fake-model", port=0,
                                   keepalive_idle=0.2))
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive: HTTP/1.1's default
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        async with asyncio.timeout(30):  # aiohttp's own default would keep it for 75 s
            assert await reader.read() == b""  # the relay closed the idle connection
        writer.close()
    finally:
        await runner.cleanup()


def test_keepalive_idle_must_be_positive() -> None:
    import pytest

    from relay.config import ConfigError

    with pytest.raises(ConfigError, match="--keepalive-idle"):
        Config(keepalive_idle=0)


async def test_the_relay_raises_its_open_file_limit_and_reports_it(tmp_path: Path, upstream: FakeUpstream,
                                                                   session: Any, notify: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    env = {"TEST_NOFILE": str(low)}  # started with a low soft limit: it must raise it itself
    sock = listening_socket()
    port = sock.getsockname()[1]
    with sock:
        async with spawn_relay(tmp_path, upstream, env=env, notify=notify, listen=sock):
            await notify.until("READY")
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                health = json.loads(await resp.text())
    want = hard if hard != resource.RLIM_INFINITY else low
    assert health["open_files_limit"] == want and 0 < health["open_files"] < want
