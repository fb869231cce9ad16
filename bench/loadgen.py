"""The load generator: thousands of streaming clients on raw asyncio protocols, in its own process.

Each client sends one request, decodes the chunked body as it arrives, stamps every event
(``\\n\\n``) with the time it arrived, and at the end compares the whole body byte for byte
with what ``wire`` says it must be.  Afterwards it asks the fake upstream when each request
arrived and when its connection closed, and prints one JSON object of figures:

    python -m bench.loadgen '<spec as JSON>'

Spec keys: host, port, path, kind ("chat" or "openai"), upstream (port), prefix, streams, n,
dt, ramp (seconds over which the starts are spread), close_after ([lo, hi]: close after token
c, c uniform in the range), silent (the upstream answers nothing; close after the first
event), measure_from (only tokens due this many seconds after the
first start count in the delay figures), ttft_from (likewise for the streams whose time to first
token counts), hold (once every stream has its first token, print ``{"held": N}`` and wait for a line
on stdin before closing them all), upstream_close (the fake upstream closes each connection after
its answer), timeout.

With ``soak`` (seconds), ``streams`` is the number kept open: each stream that ends is checked,
counted and dropped, and a new one takes its place until ``soak`` seconds have passed (or
``total`` streams have started); every ``report_every`` seconds a line ``{"progress": ...}`` goes to
stderr.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
from typing import Any

from bench import wire
from bench.procs import raise_nofile, use_fast_loop


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


class Client(asyncio.Protocol):
    __slots__ = ("run", "key", "request", "transport", "start", "first_byte", "status", "location",
                 "head", "raw", "left", "crlf", "body", "scan", "times", "complete", "close_at", "closed_at",
                 "error", "finished")

    def __init__(self, run: Run, key: str, request: bytes, close_at: int | None) -> None:
        self.run, self.key, self.request, self.close_at = run, key, request, close_at
        self.transport: asyncio.Transport | None = None
        self.start = 0.0
        self.first_byte: float | None = None
        self.status = 0
        self.location = ""
        self.head: bytearray | None = bytearray()
        self.raw = bytearray()
        self.left = 0
        self.crlf = False
        self.body = bytearray()
        self.scan = 0
        self.times: list[float] = []
        self.complete = False
        self.closed_at: float | None = None
        self.error: str | None = None
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.first_byte is None:
            self.first_byte = now
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.lower()
                if name == "location":
                    self.location = value.strip()
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            data = bytes(self.head[end + 4:])
            self.head = None
            if self.status != 200 or not chunked:
                self.fail(f"status {self.status}{'' if chunked else ', not chunked'}")
                return
        self.feed(data, now)

    def feed(self, data: bytes, now: float) -> None:
        raw = self.raw
        raw += data
        pos = 0
        body = self.body
        while True:
            if self.left:
                take = min(self.left, len(raw) - pos)
                body += raw[pos:pos + take]
                pos += take
                self.left -= take
                if self.left:
                    break
                self.crlf = True
            if self.crlf:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self.crlf = False
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(raw[pos:end], 16)
            pos = end + 2
            if size == 0:
                self.complete = True
                break
            self.left = size
        del raw[:pos]
        while (end := body.find(b"\n\n", self.scan)) >= 0:
            self.times.append(now)
            self.scan = end + 2
        if self.complete:
            self.check()
            self.done()
        elif self.close_at is not None and len(self.times) >= self.close_at + 2:
            self.closed_at = time.monotonic()
            self.check(prefix=True)
            self.done()

    def expected(self) -> bytes:
        n = self.run.n
        if self.run.kind == "chat":
            return wire.chat_body(self.location.rpartition("/")[2], n)
        if self.run.kind == "responses":
            return wire.responses_body(self.key, n)
        return wire.openai_body(self.key, n)

    def check(self, prefix: bool = False) -> None:
        want = self.expected()
        got = bytes(self.body)
        if prefix:
            got = got[:got.rfind(b"\n\n") + 2]
            ok = want.startswith(got)
        else:
            ok = got == want
        if not ok:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            self.error = f"content differs at byte {at}: got {got[at - 40:at + 40]!r}, want {want[at - 40:at + 40]!r}"

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.done()

    def done(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.transport is not None:
            self.transport.close()
        self.run.finished_one(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.fail(f"connection lost after {len(self.body)} bytes ({exc!r})")


def shutdown_now(transport: asyncio.BaseTransport) -> None:
    """FIN now (uvloop's transport socket refuses shutdown: a second socket object on the same fd)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return
    raw = socket.socket(sock.family, sock.type, 0, sock.fileno())
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        raw.detach()


class Run:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind: str = spec["kind"]
        self.n: int = spec.get("n", 10)
        self.dt: float = spec.get("dt", 0.1)
        self.clients: list[Client] = []
        self.left = spec["streams"]
        self.all_done = asyncio.get_running_loop().create_future()
        self.first_tokens = 0

    def finished_one(self, client: Client) -> None:
        self.left -= 1
        if self.left == 0 and not self.all_done.done():
            self.all_done.set_result(None)

    def request(self, key: str) -> bytes:
        spec = self.spec
        body = wire.request_body(key, self.n, self.dt, openai=self.kind == "openai", silent=spec.get("silent", False),
                                 close=spec.get("upstream_close", False), responses=self.kind == "responses")
        return (f"POST {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1:{spec['port']}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def new_client(self, key: str, close_at: int | None) -> Client:
        client = Client(self, key, b"", close_at)
        client.request = self.request(key)
        return client

    async def until_due(self, began: float, i: int, streams: int, ramp: float) -> None:
        """Until the i-th of ``streams`` starts spread over ``ramp`` seconds from ``began`` is due."""
        delay = began + ramp * i / streams - time.monotonic()
        if delay > 0.002:
            await asyncio.sleep(delay)

    async def connect(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        client.start = time.monotonic()
        try:
            await loop.create_connection(lambda: client, self.spec["host"], self.spec["port"])
        except OSError as exc:
            client.fail(f"connect: {exc!r}")

    async def go(self) -> dict[str, Any]:
        spec = self.spec
        rng = random.Random(1)
        streams, ramp = spec["streams"], spec.get("ramp", 0.0)
        silent = spec.get("silent", False)
        lo_hi = spec.get("close_after")
        tasks = []
        began = time.monotonic()
        for i in range(streams):
            await self.until_due(began, i, streams, ramp)
            close_at = 0 - 1 if silent else (rng.randint(*lo_hi) if lo_hi else None)
            client = self.new_client(f"{spec['prefix']}{i}", close_at)
            self.clients.append(client)
            tasks.append(asyncio.ensure_future(self.connect(client)))
        if spec.get("hold"):
            await self.hold()
        try:
            async with asyncio.timeout(spec.get("timeout", 120)):
                await self.all_done
        except TimeoutError:
            for client in self.clients:
                if not client.finished:
                    client.fail(f"timed out after {len(client.times)} events")
        ended = time.monotonic()
        await asyncio.gather(*tasks)
        return await self.report(began, ended)

    async def hold(self) -> None:
        """Every stream open with its first token in: tell the orchestrator, wait for its word."""
        async with asyncio.timeout(self.spec.get("timeout", 120)):
            while sum(1 for c in self.clients if len(c.times) >= 2 or c.finished) < len(self.clients):
                await asyncio.sleep(0.05)
        print(json.dumps({"held": sum(1 for c in self.clients if not c.finished)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        # All closed first, checked after: a check between two closes would count the load
        # generator's own work in every later client's disconnect figure.
        # The FIN goes out in the close itself (shutdown): transport.close() would send it only
        # on the loop's next iteration, after this whole loop.
        leaving = [client for client in self.clients if not client.finished]
        for client in leaving:
            client.closed_at = time.monotonic()
            if client.transport is not None:
                shutdown_now(client.transport)
                client.transport.close()
        for client in leaving:
            client.check(prefix=True)
            client.done()

    async def upstream_stats(self) -> dict[str, dict[str, float]]:
        left = {c.key for c in self.clients if c.closed_at is not None}
        deadline = time.monotonic() + 10.0
        while True:
            result = await self.fetch_stats()
            # Until every early close has reached the upstream (a burst of a thousand takes a while).
            if not left or left <= result["closed"].keys() or time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.05)

    async def fetch_stats(self) -> dict[str, dict[str, float]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.spec["upstream"])
        writer.write(f"GET /_bench/stats?prefix={self.spec['prefix']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        result: dict[str, dict[str, float]] = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return result

    async def report(self, began: float, ended: float) -> dict[str, Any]:
        stats = await self.upstream_stats()
        t0, closed, lag = stats["t0"], stats["closed"], stats["lag"]
        errors = [c.error for c in self.clients if c.error]
        ttft, ttfb, delays, disconnect = [], [], [], []
        events = 0
        settled = began + self.spec.get("measure_from", 0.0)
        ttft_from = began + self.spec.get("ttft_from", 0.0)
        for c in self.clients:
            if c.first_byte is not None:
                ttfb.append(c.first_byte - c.start)
            if len(c.times) >= 2 and c.start >= ttft_from:
                ttft.append(c.times[1] - c.start)
            origin = t0.get(c.key)
            tokens = c.times[1:1 + self.n]
            events += len(tokens)
            if origin is not None:
                delays.extend(t - due for i, t in enumerate(tokens) if (due := origin + i * self.dt) >= settled)
            if c.closed_at is not None and c.key in closed:
                disconnect.append(closed[c.key] - c.closed_at)
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        return {
            "streams": len(self.clients), "ok": len(self.clients) - len(errors), "errors": len(errors),
            "error_samples": errors[:5], "events": events, "seconds": round(ended - began, 3),
            "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)), "n": len(ttft)},
            "ttfb_ms": {"p50": ms(pct(ttfb, 50)), "p99": ms(pct(ttfb, 99)), "n": len(ttfb)},
            "delay_ms": {"p50": ms(pct(delays, 50)), "p99": ms(pct(delays, 99)), "max": ms(max(delays, default=None)),
                         "n": len(delays)},
            "upstream_lag_ms": {"p99": ms(pct(list(lag.values()), 99)), "max": ms(max(lag.values(), default=None))},
            "disconnect_ms": {"p50": ms(pct(disconnect, 50)), "p99": ms(pct(disconnect, 99)),
                              "max": ms(max(disconnect, default=None)), "n": len(disconnect)},
        }


class Soak(Run):
    """Streams kept at ``streams`` open for ``soak`` seconds, each replaced when it ends."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.began = 0.0
        self.until = 0.0
        self.total = spec.get("total")
        self.started = 0
        self.ok = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.events = 0
        self.ttft: list[float] = []
        self.connecting: set[asyncio.Future[None]] = set()
        self.live: set[Client] = set()
        self.no_more = False

    def start_one(self) -> None:
        client = self.new_client(f"{self.spec['prefix']}{self.started}", None)
        self.started += 1
        self.live.add(client)
        task = asyncio.ensure_future(self.connect(client))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    def more(self) -> bool:
        if self.no_more or time.monotonic() >= self.until or (self.total is not None and self.started >= self.total):
            self.no_more = True
        return not self.no_more

    def finished_one(self, client: Client) -> None:
        self.live.discard(client)
        tokens = min(len(client.times) - 1, self.n)  # the first event is the start, the last the end
        self.events += max(tokens, 0)
        if tokens >= 1:
            self.ttft.append(client.times[1] - client.start)
        if client.error is None:
            self.ok += 1
        else:
            if client.error.startswith("connect:"):
                self.no_more = True  # the server is gone or refusing: no point replacing anything
            self.error_count += 1
            if len(self.errors) < 5:
                self.errors.append(f"{client.key}: {client.error}")
        if self.more():
            self.start_one()
        elif not self.live and not self.all_done.done():
            self.all_done.set_result(None)

    async def go(self) -> dict[str, Any]:
        spec = self.spec
        streams, ramp = spec["streams"], spec.get("ramp", 0.0)
        self.began = time.monotonic()
        self.until = self.began + spec["soak"]
        for i in range(streams):
            await self.until_due(self.began, i, streams, ramp)
            if not self.more():
                break
            self.start_one()
        if not self.live and not self.all_done.done():
            self.all_done.set_result(None)
        every = spec.get("report_every", 10.0)
        while not self.all_done.done():
            await asyncio.wait([self.all_done], timeout=every)
            print(json.dumps({"progress": {"t": round(time.monotonic() - self.began, 1), "started": self.started,
                                           "open": len(self.live), "ok": self.ok, "errors": self.error_count}}),
                  file=sys.stderr, flush=True)
            if time.monotonic() > self.until + spec.get("timeout", 120):
                self.no_more = True
                for client in list(self.live):
                    client.fail(f"timed out after {len(client.times)} events")
        ended = time.monotonic()
        if self.connecting:
            await asyncio.gather(*self.connecting)
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        return {"streams": self.started, "ok": self.ok, "errors": self.error_count, "error_samples": self.errors,
                "events": self.events, "seconds": round(ended - self.began, 3),
                "ttft_ms": {"p50": ms(pct(self.ttft, 50)), "p99": ms(pct(self.ttft, 99)), "n": len(self.ttft)}}


async def main_async(spec: dict[str, Any]) -> None:
    result = await (Soak(spec) if "soak" in spec else Run(spec)).go()
    print(json.dumps(result), flush=True)


def main() -> None:
    raise_nofile()
    spec = json.loads(sys.argv[1])
    use_fast_loop(lambda: main_async(spec))


if __name__ == "__main__":
    main()
