"""deploy/nginx.conf in a real nginx: TLS and HTTP/2 in front, tokens unbuffered, aborts passed on.

The test runs the shipped file, changed only by ``site_for_test``'s explicit list of
replacements (ports, certificate paths, the relay's address), each of which must match
exactly once, so a test can never drift from what an operator installs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import FakeUpstream, RelayFactory, chunk, require, sse, wait_for
from procs import first_delta_then_wait, stop_group

from bench.procs import free_port
from relay.sse import SSEDecoder

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


def site_for_test(text: str, *, tls_port: int, http_port: int, relay_port: int | None, cert: Path,
                  key: Path) -> str:
    replacements = [
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("/etc/letsencrypt/live/relay.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/relay.example.com/privkey.pem", str(key)),
    ]
    if relay_port is not None:  # None: the caller has put its own upstream block in
        replacements.append(("server 127.0.0.1:8080;", f"server 127.0.0.1:{relay_port};"))
    for old, new in replacements:
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


def main_config(prefix: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf provides around a conf.d file, with every path in the test's prefix."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the tmp prefix
    temp = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n    access_log off;\n{temp}    include {site};\n}}\n")


def make_certificate(prefix: Path) -> tuple[Path, Path]:
    cert, key = prefix / "cert.pem", prefix / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class Front:
    url: str
    tls: ssl.SSLContext

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, http2=True, verify=self.tls, timeout=30, **kw)


@pytest.fixture
async def front(tmp_path: Path, make_relay: RelayFactory) -> AsyncIterator[Front]:
    """nginx with the shipped site, in front of the relay.

    Resume grace 0: a disconnect cancels the stream at once.  No keepalive comments during a
    test: a write to a client that has gone also ends the request (even with
    proxy_ignore_client_abort on), and would hide whether nginx passed the abort on by itself.
    """
    relay = await make_relay(resume_grace=0, keepalive=3600)
    async with run_nginx(tmp_path, SHIPPED.read_text(), relay.server.port) as front_:
        yield front_


@asynccontextmanager
async def run_nginx(tmp_path: Path, text: str, relay_port: int | None) -> AsyncIterator[Front]:
    """nginx running ``text`` (the shipped site) through ``site_for_test``, stopped by its group afterwards."""
    require(shutil.which("nginx") is not None, "nginx is not installed")
    require(shutil.which("openssl") is not None, "openssl is not installed")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cert, key = make_certificate(prefix)
    tls_port = free_port()
    site = prefix / "relay.conf"
    site.write_text(site_for_test(text, tls_port=tls_port, http_port=free_port(),
                                  relay_port=relay_port, cert=cert, key=key))
    (prefix / "nginx.conf").write_text(main_config(prefix, site))
    log = prefix / "stderr.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "nginx", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr notice;",
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    try:
        async with asyncio.timeout(20):  # bounded poll for the port, failing early if nginx exits
            while True:
                assert proc.returncode is None, log.read_text()
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", tls_port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield Front(f"https://127.0.0.1:{tls_port}", ssl.create_default_context(cafile=str(cert)))
    finally:
        # The master and its workers, by their process group: a SIGKILLed master leaves its
        # workers behind, still listening.  SIGQUIT is nginx's graceful stop.
        await stop_group(proc, signal.SIGQUIT)


async def read_events(lines: AsyncIterator[bytes], decoder: SSEDecoder, until: str) -> list[str]:
    """Feed raw chunks to the decoder until an event whose data mentions ``until``; return every data seen."""
    seen: list[str] = []
    async for data in lines:
        seen.extend(event.data for event in decoder.feed(data))
        if any(until in d for d in seen):
            return seen
    raise AssertionError(f"the stream ended before {until!r}: {seen}")


async def test_a_delta_passes_through_nginx_before_the_upstream_pauses_ends(
        front: Front, upstream: FakeUpstream) -> None:
    gates: dict[str, asyncio.Event] = {}
    upstream.behaviour = first_delta_then_wait(gates)
    async with front.client() as client, client.stream("POST", "/chat", json={"prompt": "first"}) as resp:
        assert resp.status_code == 200 and resp.http_version == "HTTP/2"
        chunks = resp.aiter_raw()
        decoder = SSEDecoder()
        # The upstream is paused until the test sets the gate: the delta can only have come through
        # unbuffered.  (If nginx held it, this read would hang and the bounded timeout fail it.)
        async with asyncio.timeout(15):
            seen = await read_events(chunks, decoder, '"delta"')
        assert not gates["first"].is_set() and '"content":"first"' in seen[-1]
        gates["first"].set()
        rest = await read_events(chunks, decoder, '"done"')
    assert '"finish_reason":"stop"' in rest[-1]


async def test_a_client_disconnect_at_nginx_closes_the_upstream_connection(
        front: Front, upstream: FakeUpstream) -> None:
    upstream.behaviour = first_delta_then_wait({})  # never finishes on its own
    client = front.client()
    try:
        async with client.stream("POST", "/chat", json={"prompt": "bye"}) as resp:
            await read_events(resp.aiter_raw(), SSEDecoder(), '"delta"')
    finally:
        await client.aclose()  # the tab closes: nginx → relay → upstream must all let go
    await wait_for(upstream.closed.is_set, timeout=20)


async def test_eight_concurrent_streams_on_one_http2_connection_all_complete(
        front: Front, upstream: FakeUpstream) -> None:
    all_in = asyncio.Event()

    async def together(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        # Each answer waits until all eight requests have reached the upstream: they can only
        # complete if the one HTTP/2 connection really carries them at the same time.
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        if fake.calls >= 8:
            all_in.set()
        await all_in.wait()
        await fake.send(resp, sse(chunk("together", finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp

    upstream.behaviour = together

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
        async with client.stream("POST", "/chat", json={"prompt": f"n{i}"}) as resp:
            return resp.http_version, await read_events(resp.aiter_raw(), SSEDecoder(), '"done"')

    async with front.client(limits=httpx.Limits(max_connections=1)) as client, asyncio.timeout(30):
        results = await asyncio.gather(*(one(client, i) for i in range(8)))
    assert upstream.calls == 8
    for version, seen in results:
        assert version == "HTTP/2"
        assert '"content":"together"' in seen[-2] and '"type":"done"' in seen[-1]


async def test_two_instances_behind_one_upstream_block_resume_on_either(
        redis: Any, tmp_path: Path, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    """deploy/redis/nginx-upstream.conf's block in the shipped site: two relays sharing one Redis."""
    from relay.core.redis_store import RedisStore
    from relay.http.appkeys import STORE

    settings = {"redis_url": redis.url, "owner_ttl": 0.6, "presence_ttl": 0.6, "keepalive": 3600}
    a, b = await make_relay(**settings), await make_relay(**settings)
    block = (SHIPPED.parent / "redis" / "nginx-upstream.conf").read_text()
    block = block[block.rindex("upstream relay {"):]  # the block itself, not its mention in the comment
    for shipped, mine in (("10.0.0.11:8080", f"127.0.0.1:{a.server.port}"),
                          ("10.0.0.12:8080", f"127.0.0.1:{b.server.port}")):
        assert block.count(shipped) == 1
        block = block.replace(shipped, mine)
    text = SHIPPED.read_text()
    start = text.index("upstream relay {")
    text = text[:start] + block + text[text.index("}", start) + 1:]
    gates: dict[str, asyncio.Event] = {}
    upstream.behaviour = first_delta_then_wait(gates)
    stores = [a.app[STORE], b.app[STORE]]
    assert all(isinstance(st, RedisStore) for st in stores)
    async with run_nginx(tmp_path, text, None) as front, \
            front.client() as client:
        async with client.stream("POST", "/chat", json={"prompt": "first"}) as resp:
            location = resp.headers["location"]
            decoder = SSEDecoder()
            seen = await read_events(resp.aiter_raw(), decoder, '"delta"')
        last_id = decoder.last_event_id
        # Round robin across the two: resume until the instance without the stream has served one.
        served_remote = lambda: sum(st.remote_reads for st in stores)  # noqa: E731
        async with asyncio.timeout(20):
            while served_remote() == 0:
                async with client.stream("GET", location, headers={"Last-Event-ID": last_id}) as again:
                    assert again.status_code == 200
                    await again.aclose()
        gates["first"].set()
        async with client.stream("GET", location, headers={"Last-Event-ID": last_id}) as again:
            rest = await read_events(again.aiter_raw(), SSEDecoder(), '"done"')
        assert '"content":" done"' in rest[-2] and '"finish_reason":"stop"' in rest[-1]
        assert '"content":"first"' in seen[-1]
        assert upstream.calls == 1
