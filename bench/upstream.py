"""The fake upstream: a lean OpenAI-compatible chat-completions server in its own process.

Raw asyncio protocol (no framework), one timer callback per token, so it costs little next to
what it feeds.  It honours backpressure as a real server's HTTP layer does: while its transport's
buffer is full (a reader that stopped reading) an answer waits, and its schedule moves by the
wait; without that, 300 stalled streams kept this process at a core's worth of timers filling
buffers no one read, which on a small machine slowed everything else measured beside them.
The user message says what to send (``wire.prompt``): ``n`` tokens ``dt`` seconds apart, the
first at once; ``silent=1`` answers nothing until the connection closes.
For each stream (by its key) it records when the request arrived (t0, the schedule's origin),
when the connection closed before the answer was finished, and how late its own timers ran.
``GET /_bench/stats?prefix=P`` returns those for the keys starting with P.

    python -m bench.upstream --port 0      # prints "READY <port>" once listening
    python -m bench.upstream --tls-cert C --tls-key K   # the same over TLS (the remote phase)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import time
from urllib.parse import parse_qs, urlsplit

from bench import wire
from bench.procs import raise_nofile, use_fast_loop

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"x-request-id: req-bench\r\nTransfer-Encoding: chunked\r\n\r\n")
CLOSING_HEAD = HEAD[:-2] + b"Connection: close\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stats:
    def __init__(self) -> None:
        self.t0: dict[str, float] = {}
        self.closed: dict[str, float] = {}
        self.lag: dict[str, float] = {}  # the latest any of the stream's timers ran, seconds


class Answer:
    """One streamed answer on one connection, driven by call_at timers."""

    __slots__ = ("conn", "key", "n", "dt", "t0", "chunks", "usage", "close", "i", "handle", "done", "held",
                 "events")

    def __init__(self, conn: Conn, key: str, n: int, dt: float, usage: bool, close: bool = False,
                 responses: bool = False) -> None:
        self.conn, self.key, self.n, self.dt, self.usage, self.close = conn, key, n, dt, usage, close
        self.t0 = time.monotonic()
        self.chunks = wire.Chunks(key)
        #: The Responses API's events instead of chat completion chunks.
        self.events = wire.ResponseEvents(key) if responses else None
        self.i = 0
        self.handle: asyncio.TimerHandle | None = None
        self.done = False
        #: When the answer began to wait for its reader (monotonic), or None.
        self.held: float | None = None

    def begin(self) -> None:
        first = self.events.created() if self.events is not None else self.chunks.role()
        self.conn.transport.write((CLOSING_HEAD if self.close else HEAD) + chunked(first))
        self.tick()

    def tick(self) -> None:
        self.handle = None
        now = time.monotonic()
        if self.conn.paused:
            self.held = now
            return
        lag = now - (self.t0 + self.i * self.dt)
        stats = self.conn.stats
        if lag > stats.lag.get(self.key, 0.0):
            stats.lag[self.key] = lag
        events = self.events
        out = chunked(events.token(self.i) if events is not None else self.chunks.token(self.i))
        self.i += 1
        if self.i >= self.n and events is not None:
            out += chunked(events.completed(self.n)) + b"0\r\n\r\n"
        elif self.i >= self.n:
            out += chunked(self.chunks.finish())
            if self.usage:
                out += chunked(self.chunks.usage(self.n))
            out += chunked(wire.DONE) + b"0\r\n\r\n"
        if self.i >= self.n:
            self.conn.transport.write(out)
            self.done = True
            if self.close:
                self.conn.transport.close()
            else:
                self.conn.answer_done()
            return
        self.conn.transport.write(out)
        loop = self.conn.loop
        self.handle = loop.call_at(loop.time() + (self.t0 + self.i * self.dt - time.monotonic()), self.tick)

    def resume(self) -> None:
        if self.held is not None and not self.done:
            self.t0 += time.monotonic() - self.held  # the wait was the reader's, not a late timer
            self.held = None
            self.tick()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Conn(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.answer: Answer | None = None
        self.silent_key: str | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.answer is not None:
            self.answer.resume()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next_request()

    def next_request(self) -> None:
        while self.answer is None and self.silent_key is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self.handle(method, target, body)

    def handle(self, method: str, target: str, body: bytes) -> None:
        url = urlsplit(target)
        if method == "POST" and url.path in ("/v1/chat/completions", "/v1/responses"):
            req = json.loads(body)
            responses = url.path == "/v1/responses"
            params = wire.parse_prompt(req["input"] if responses else req["messages"][-1]["content"])
            key = params["key"]
            if params.get("silent") == "1":
                self.stats.t0[key] = time.monotonic()
                self.silent_key = key
                return
            usage = bool((req.get("stream_options") or {}).get("include_usage"))
            if params.get("sndbuf"):
                sock = self.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(params["sndbuf"]))
            self.answer = Answer(self, key, int(params["n"]), float(params["dt"]), usage, params.get("close") == "1",
                                 responses)
            self.stats.t0[key] = self.answer.t0
            self.answer.begin()
        elif method == "GET" and url.path == "/_bench/stats":
            prefix = parse_qs(url.query).get("prefix", [""])[0]
            s = self.stats
            out = {name: {k: v for k, v in table.items() if k.startswith(prefix)}
                   for name, table in (("t0", s.t0), ("closed", s.closed), ("lag", s.lag))}
            self.reply(json.dumps(out).encode(), close=True)
        elif method == "GET" and url.path == "/v1/models":
            self.reply(b'{"object":"list","data":[]}')
        else:
            self.reply(b'{"error":{"message":"not found"}}', status=b"404 Not Found")

    def reply(self, body: bytes, *, status: bytes = b"200 OK", close: bool = False) -> None:
        self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (status, len(body), b"Connection: close\r\n" if close else b"", body))
        if close:
            self.transport.close()

    def answer_done(self) -> None:
        self.answer = None
        if self.buf:
            self.loop.call_soon(self.next_request)

    def connection_lost(self, exc: Exception | None) -> None:
        now = time.monotonic()
        if self.answer is not None and not self.answer.done:
            self.stats.closed[self.answer.key] = now
            self.answer.stop()
        elif self.silent_key is not None:
            self.stats.closed[self.silent_key] = now


async def serve(host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(stats), host, port, backlog=16384, reuse_address=True, ssl=tls)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    args = parser.parse_args(argv)
    raise_nofile()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        use_fast_loop(lambda: serve(args.host, args.port, tls))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
