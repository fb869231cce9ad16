"""Shared fixtures: a scriptable fake upstream and the relay, each a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.http.app import make_app
from relay.config import Config
from relay.sse import Event, SSEDecoder

TEST_KEY = "sk-test-SECRET-0123456789abcdef"
PR_SET_CHILD_SUBREAPER = 36
REQUIRE_ALL = os.environ.get("RELAY_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip with a reason when a real component is missing; under RELAY_REQUIRE_ALL=1, fail instead."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"RELAY_REQUIRE_ALL=1 but {reason}")
    pytest.skip(reason)


def chunk(content: str | None = None, *, finish_reason: str | None = None, role: str | None = None,
          **delta: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(delta)
    if role is not None:
        d["role"] = role
    if content is not None:
        d["content"] = content
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish_reason}]}


def sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


Behaviour = Callable[[web.Request, "FakeUpstream"], Awaitable[web.StreamResponse]]


@dataclass
class FakeUpstream:
    """An OpenAI-compatible upstream whose behaviour each test sets; it records what it saw."""

    behaviour: Behaviour | None = None
    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    calls: int = 0
    chunks_sent: int = 0
    #: set when a streaming handler saw its client go away (cancellation) — the billing stops here.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_after_chunks: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: False: every response closes its connection, so no idle keep-alive sockets blur fd counts.
    keepalive: bool = True
    server: Any = None
    #: GET /v1/models (the relay's readiness probe): the status to answer, and the headers seen.
    models_status: int = 200
    models_headers: list[dict[str, str]] = field(default_factory=list)
    #: The relay's address for each request: one per upstream connection it opened.
    peers: list[Any] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        self.models_headers.append(dict(request.headers))
        if self.models_status != 200:
            return web.json_response({"error": {"message": "fake failure"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        behaviour = self.behaviour or tokens(["Hello", ",", " world", "!"])
        try:
            resp = await behaviour(request, self)
            if not self.keepalive:
                resp.force_close()
            return resp
        except asyncio.CancelledError:
            self.closed_after_chunks = self.chunks_sent
            self.closed.set()
            raise
        except ConnectionResetError:  # the relay closed while we were writing: the same event
            self.closed_after_chunks = self.chunks_sent
            self.closed.set()
            return web.Response()

    async def start_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "req-fake-1"})
        if not self.keepalive:
            resp.force_close()
        await resp.prepare(request)
        return resp

    async def send(self, resp: web.StreamResponse, data: bytes) -> None:
        await resp.write(data)
        self.chunks_sent += 1


def tokens(parts: list[str], *, delay: float = 0.0, finish: str = "stop", usage: bool = True,
           done: bool = True) -> Behaviour:
    """A normal streamed answer: role chunk, one chunk per part (``delay`` apart), finish, usage, [DONE]."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        for i, part in enumerate(parts):
            if delay and i:
                await asyncio.sleep(delay)  # the upstream's pace, not synchronisation
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(finish_reason=finish)))
        if usage:
            await fake.send(resp, sse({"id": "x", "object": "chat.completion.chunk", "choices": [],
                                       "usage": {"prompt_tokens": 3, "completion_tokens": len(parts),
                                                 "total_tokens": 3 + len(parts)}}))
        if done:
            await fake.send(resp, sse("[DONE]"))
        return resp
    return run


def paused(first: str, then: str) -> Behaviour:
    """``first`` (with the role), then silence until ``fake.release`` is set, then ``then`` and the end."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk(first, role="assistant")))
        await fake.release.wait()
        await fake.send(resp, sse(chunk(then, finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


class SSEClient:
    """Reads a relay response event by event with the project's own spec decoder, keeping raw bytes."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.decoder = SSEDecoder()
        self.pending: list[Event] = []
        self.raw = bytearray()

    async def next(self) -> Event | None:
        while not self.pending:
            data = await self.resp.content.readany()
            if not data:
                return None
            self.raw += data
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def next_json(self) -> dict[str, Any] | None:
        event = await self.next()
        return None if event is None else json.loads(event.data)

    async def all_data(self) -> list[str]:
        """Every remaining event's data string (``/v1``'s last one, ``[DONE]``, is not JSON)."""
        out = []
        while (event := await self.next()) is not None:
            out.append(event.data)
        return out

    async def all(self) -> list[dict[str, Any]]:
        out = []
        while (obj := await self.next_json()) is not None:
            out.append(obj)
        return out


def open_connections(*servers: Any) -> int:
    """Connections the given aiohttp test servers hold open right now."""
    return sum(len(server.runner.server.connections) for server in servers)


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("content", "") for e in events if e["type"] == "delta")


@pytest.fixture
async def upstream(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.server = server
    fake.base_url = str(server.make_url("/v1"))
    return fake


RelayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_relay(upstream: FakeUpstream, aiohttp_client: Any) -> RelayFactory:
    """Start the relay (real server, real client) against the fake upstream; overrides go to Config.

    ``upstream`` comes first so that it is torn down last: the relay closes first, which closes
    its upstream connections, so the fake's handlers (perhaps waiting on a gate) end at once
    instead of holding the fake's shutdown for its whole handler timeout.
    """
    async def factory(**overrides: Any) -> TestClient[web.Request, web.Application]:
        # Every test client is 127.0.0.1: per-client limits are off unless a test sets them
        # (tests/test_security.py), so tests of volume measure what they mean to.
        settings: dict[str, Any] = {"upstream": upstream.base_url, "api_key": TEST_KEY, "model": "fake-model",
                                    "rate_limit": 0, "max_streams_per_client": 1_000_000}
        settings.update(overrides)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(make_app(Config(**settings)))
        return client
    return factory


@pytest.fixture
def serve_relay(upstream: FakeUpstream) -> Callable[..., AbstractAsyncContextManager[int]]:
    """The relay as ``relay serve`` runs it (relay.run.server.start: its own runner, keep-alive
    timer and connection limits, which ``make_relay``'s test client does not have) against the
    fake upstream; ``async with serve_relay(**settings) as port``."""
    @asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[int]:
        from relay.run.server import start

        settings: dict[str, Any] = {"upstream": upstream.base_url, "api_key": TEST_KEY, "model": "fake-model",
                                    "port": 0, **overrides}
        runner, _ = await start(Config(**settings))
        try:
            yield runner.addresses[0][1]
        finally:
            await runner.cleanup()
    return run


@pytest.fixture
async def relay(make_relay: RelayFactory) -> TestClient[web.Request, web.Application]:
    return await make_relay()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Await a condition the code under test makes true (bounded, so a bug fails instead of hanging)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"condition not reached within {timeout} s: {what or predicate}")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def notify() -> AsyncIterator[Any]:
    """A systemd notify socket (tests/procs.py's NotifyListener) for a spawned relay."""
    from procs import NotifyListener

    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


# -- No process left behind ----------------------------------------------------------------
# pytest is made a child subreaper, so a process that a test started and that outlived its
# parent (an nginx worker whose master was killed, a relay's child) is re-parented to pytest
# instead of to init, where it could not be seen.  At the end of the session every child of
# pytest must be gone; one that is still alive fails the run (and is killed).


def pytest_configure(config: pytest.Config) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing re-parents to us, the check sees less
        pass


def _children() -> dict[int, str]:
    """Live (non-zombie) children of this process: pid → command line."""
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if int(ppid) != me or state == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + 10  # a process told to stop may take a moment to exit
    left = _children()
    while left and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
        left = _children()
    _reap()
    if not left:
        return
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    if reporter is not None:
        reporter.write_line(f"FAILED: the tests left {len(left)} processes running (now killed):\n{text}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    """A real redis-server (Debian's) on a temporary unix socket, stopped by its PID afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    import redis_server

    require(redis_server.available(), "redis-server is not installed (apt-get install redis-server)")
    # A short directory: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    workdir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
    try:
        async with redis_server.redis_server(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis_cluster() -> AsyncIterator[Any]:
    """A real Redis Cluster (three masters, a replica each) on loopback ports, every node stopped by its PID."""
    import shutil
    import tempfile
    from pathlib import Path

    import redis_server

    require(redis_server.available() and shutil.which("redis-cli") is not None,
            "redis-server and redis-cli are not installed (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="relay-cluster-"))
    try:
        async with redis_server.redis_cluster(workdir) as cluster:
            yield cluster
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- A raw upstream: bytes exactly as a test scripts them -------------------------------------

@asynccontextmanager
async def raw_upstream(script: bytes | list[bytes | asyncio.Event]) -> AsyncIterator[str]:
    """A hostile upstream on loopback: it reads the request, writes ``script`` as is and closes.

    A list is written piece by piece, waiting at each ``asyncio.Event`` until the test sets it.
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        for piece in [script] if isinstance(script, bytes) else script:
            if isinstance(piece, asyncio.Event):
                await piece.wait()
            else:
                writer.write(piece)
                await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        await server.wait_closed()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
