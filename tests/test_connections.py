"""What a connection may cost before its request is in: a request head must be complete within
--header-timeout (a new connection's from its start, a kept-alive one's from its first byte) and
within --keepalive-idle of the connection's start or its previous answer; one that is not gets 408
and is closed, while a connection that sent nothing is closed silently.  A body has its own
deadline; and the process raises its open-file limit and says how close it is."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import FakeUpstream, SSEClient, paused, text_of
from procs import listening_socket, spawn_relay
from relay.config import Config, ConfigError


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_idle(upstream: FakeUpstream, serve_relay: Any) -> None:
    async with serve_relay(keepalive_idle=0.2) as port:
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


def test_keepalive_idle_must_be_positive() -> None:
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


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_slowloris_connections_are_closed_at_the_deadline_while_a_healthy_stream_completes(
        upstream: FakeUpstream, serve_relay: Any) -> None:
    # aiohttp counts --keepalive-idle from the connection's start (and from each answer): a
    # request head still incomplete when it passes is cut (408, just before aiohttp would close
    # it silently), however many header lines trickled in; --header-timeout is the default 10 s.
    async with serve_relay(keepalive_idle=1.0, rate_limit=0, max_streams_per_client=1000) as port:
        baseline = fds()
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
        for _, writer in conns:
            writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed: set[int] = set()

        async def trickle() -> None:
            i = 0
            while len(closed) < len(conns):
                for n, (_, writer) in enumerate(conns):
                    if n not in closed and not writer.is_closing():
                        writer.write(b"X-Slow-%d: %d\r\n" % (i, i))  # a header line, never the blank line
                i += 1
                await asyncio.sleep(0.2)  # the attacker's pace, not synchronisation

        async def until_closed(n: int, reader: asyncio.StreamReader) -> None:
            try:
                answer = await reader.read()  # to EOF: the relay closed it
                assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:40]
            except ConnectionResetError:
                pass  # closed too: a header line written after the close drew a reset
            closed.add(n)

        drip = asyncio.create_task(trickle())
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"}) as resp:
                events = await SSEClient(resp).all()
        assert text_of(events) == "Hello, world!" and events[-1]["type"] == "done"
        async with asyncio.timeout(30):
            await asyncio.gather(*(until_closed(n, reader) for n, (reader, _) in enumerate(conns)))
        await drip
        for _, writer in conns:
            writer.close()
        await asyncio.sleep(0)
        assert fds() <= baseline + 2  # (the session's closed socket may linger a moment)


async def test_a_trickling_body_is_cut_by_its_deadline_and_the_relay_serves_on(make_relay: Any,
                                                                              upstream: FakeUpstream) -> None:
    relay = await make_relay(body_timeout=0.3, max_body=1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 500\r\n\r\n{\"prompt\": ")  # and the rest never comes
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    assert upstream.calls == 0
    resp = await relay.post("/chat", json={"prompt": "hi"})
    assert text_of(await SSEClient(resp).all()) == "Hello, world!"


async def _healthz(port: int, local: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(30):
        answer = await reader.read()
    writer.close()
    return answer


async def test_connections_per_client_are_capped_before_any_request_and_others_are_served(
        upstream: FakeUpstream, serve_relay: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with serve_relay(max_connections_per_client=3) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]  # idle: no request at all
        with caplog.at_level(logging.INFO, logger="relay.http"):
            for _ in range(5):
                answer = await _healthz(port)
                assert answer.startswith(b"HTTP/1.1 429") and b"--max-connections-per-client" in answer
        refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 1  # once per client per minute
        assert (await _healthz(port, "127.0.0.2")).startswith(b"HTTP/1.1 200")  # another address
        _, writer = held.pop()
        writer.close()
        async with asyncio.timeout(30):
            while not (await _healthz(port)).startswith(b"HTTP/1.1 200"):  # its slot is free again
                await asyncio.sleep(0.01)
        for _, writer in held:
            writer.close()


async def test_the_total_connection_bound(upstream: FakeUpstream, serve_relay: Any) -> None:
    async with serve_relay(max_connections=2) as port:
        held = [await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{i + 3}", 0))
                for i in range(2)]
        assert (await _healthz(port, "127.0.0.9")).startswith(b"HTTP/1.1 503")
        for _, writer in held:
            writer.close()


def test_the_automatic_total_leaves_room_for_upstream_connections() -> None:
    from relay.run.connections import auto_total

    assert auto_total(64) == 16  # a tiny limit still serves a few
    assert auto_total(65536) == 32736  # half: each client connection may hold an upstream one


async def test_a_request_head_late_past_header_timeout_gets_408_and_one_log_line_per_client(
        upstream: FakeUpstream, serve_relay: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.http")
    async with serve_relay(header_timeout=0.3, keepalive_idle=60, rate_limit=0, max_streams_per_client=1000) as port:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
        for _, writer in conns:
            writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")  # never the blank line
        # Meanwhile a client whose head is in time is served, its stream whole.
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"}) as resp:
                events = await SSEClient(resp).all()
        assert text_of(events) == "Hello, world!" and events[-1]["type"] == "done"
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*(reader.read() for reader, _ in conns))
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"--header-timeout" in answer
        for _, writer in conns:
            writer.close()
    lines = [r.getMessage() for r in caplog.records if "request head did not arrive" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("closed a connection from 127.0.0.1")


def test_header_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--header-timeout"):
        Config(header_timeout=0)


async def _answered_keeping_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request answered on a kept-alive connection: what follows is a later request's head."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)


async def test_a_later_head_on_a_kept_alive_connection_is_timed_from_its_first_byte(
        upstream: FakeUpstream, serve_relay: Any) -> None:
    # Long idle allowed (60 s), but a head once begun has --header-timeout, as nginx's
    # client_header_timeout; on main it was cut only at --keepalive-idle, silently.
    async with serve_relay(header_timeout=0.3, keepalive_idle=60) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _answered_keeping_alive(reader, writer)
        writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        async with asyncio.timeout(20):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"--header-timeout" in answer
        writer.close()


async def test_a_later_head_cut_by_keepalive_idle_is_answered_408_not_dropped(
        upstream: FakeUpstream, serve_relay: Any) -> None:
    async with serve_relay(header_timeout=60, keepalive_idle=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _answered_keeping_alive(reader, writer)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # begun: the client is owed an answer
        async with asyncio.timeout(20):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        writer.close()


async def test_a_body_on_a_kept_alive_connection_has_the_body_deadline_not_the_head_one(
        upstream: FakeUpstream, serve_relay: Any) -> None:
    # The request parser sees a body's bytes as it sees a head's: only bytes that arrive while
    # the connection waits for a request start a head's deadline.
    async with serve_relay(header_timeout=0.2, body_timeout=0.6, max_body=1024, keepalive_idle=60) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _answered_keeping_alive(reader, writer)
        writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"prompt\": ")
        await asyncio.sleep(0.05)  # a second packet, after the head was parsed: the attacker's pace
        writer.write(b"\"hi")  # more of the body, never all of it
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read(4096)
        assert head.startswith(b"HTTP/1.1 408") and b"--body-timeout" in rest, (head, rest)
        writer.close()
    assert upstream.calls == 0


async def test_a_head_pipelined_behind_a_running_stream_is_not_answered_inside_it(
        upstream: FakeUpstream, serve_relay: Any) -> None:
    upstream.behaviour = paused("Hello", " end")
    async with serve_relay(header_timeout=0.2, keepalive_idle=60) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"prompt": "hi"}'
        writer.write(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        stream = bytearray()
        async with asyncio.timeout(20):
            while b"Hello" not in stream:
                data = await reader.read(4096)
                assert data, bytes(stream)
                stream += data
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request's head begins, pipelined
        # A probe whose head began later has had its 408: the pipelined head's deadline passed too.
        probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", port)
        probe_writer.write(b"GET /healthz HTTP/1.1\r\n")
        async with asyncio.timeout(20):
            assert (await probe_reader.read()).startswith(b"HTTP/1.1 408")
        probe_writer.close()
        upstream.release.set()
        async with asyncio.timeout(20):
            while not stream.endswith(b"\r\n0\r\n\r\n"):  # the stream's last chunk
                data = await reader.read(4096)
                assert data, bytes(stream[-200:])  # (not closed before its end)
                stream += data
        assert b"HTTP/1.1 408" not in stream and b'"type":"done"' in stream.replace(b" ", b"")
        writer.write(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")  # the pipelined head, now whole
        async with asyncio.timeout(20):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:60]
        writer.close()
