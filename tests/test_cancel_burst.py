"""Many clients leaving at once: each upstream is told the moment its client's connection is lost.

Before relay/http/disconnects.py, a lost connection only cancelled its handler's task; the
task ran its cancellation (and closed the upstream) on a later loop iteration, after every
other handler queued with it, so under a burst the last upstream billed on for as long as all
the others took to unwind.  The order asserted here: when the relay's server has just processed
the k-th lost client connection, at least k upstream connections have had their FIN.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from conftest import FakeUpstream, chunk, sse, wait_for

CLIENTS = 20


def has_fin(fd: int) -> bool:
    """The peer has shut its side of this (loopback) connection: a peek reads end of stream."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        raw.detach()


def request_for(path: str, port: int, i: int) -> bytes:
    if path == "/chat":
        body: dict[str, Any] = {"prompt": f"client {i}"}
    else:
        body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": f"client {i}"}]}
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_a_burst_of_leaving_clients_closes_each_upstream_before_any_handler_unwinds(
        upstream: FakeUpstream, serve_relay: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # Each upstream connection's socket, duplicated: the peek stays valid after the fake upstream
    # itself has closed its side (its descriptor may be reused; the duplicate is not).
    upstream_fds: list[int] = []

    async def one_token_then_wait(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        assert request.transport is not None
        upstream_fds.append(os.dup(request.transport.get_extra_info("socket").fileno()))
        await fake.send(resp, sse(chunk("", role="assistant")))
        await fake.send(resp, sse(chunk("Hello")))
        await fake.release.wait()  # never set: only the relay's close ends this answer
        return resp

    upstream.behaviour = one_token_then_wait
    told: list[int] = []  # after each lost client connection: how many upstreams had their FIN
    try:
        async with serve_relay(resume_grace=0, rate_limit=0, max_streams_per_client=1000) as port:
            original = RequestHandler.connection_lost

            def spy(handler: RequestHandler, exc: BaseException | None) -> None:
                transport = handler.transport
                ours = transport is not None and transport.get_extra_info("sockname")[1] == port
                original(handler, exc)
                if ours:
                    told.append(sum(has_fin(fd) for fd in upstream_fds))

            clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CLIENTS)]
            for i, (_, writer) in enumerate(clients):
                writer.write(request_for(path, port, i))
            async with asyncio.timeout(10):
                for reader, _ in clients:
                    await reader.readuntil(b"Hello")
            await wait_for(lambda: len(upstream_fds) == CLIENTS, what="every upstream request open")
            monkeypatch.setattr(RequestHandler, "connection_lost", spy)
            for _, writer in clients:  # all in one step: their losses reach the relay together
                writer.transport.abort()
            await wait_for(lambda: len(told) == CLIENTS, what="the relay saw every client go")
            monkeypatch.undo()
            late = [(k, n) for k, n in enumerate(told, 1) if n < k]
            assert not late, f"(lost clients so far, upstreams told) where the upstreams lag: {late}"
            await wait_for(lambda: all(has_fin(fd) for fd in upstream_fds), what="every upstream closed")
    finally:
        for fd in upstream_fds:
            os.close(fd)
