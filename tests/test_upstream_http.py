"""The upstream's HTTP/1.1 as the relay reads it through aiohttp's client (relay/upstream/session.py).

Pinned end to end against real sockets: content codings, interim answers, every body framing,
broken heads, TLS against the system's trust store, the bound on open connections, and the read
loop itself (everything that has arrived is taken in one step).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, chunked, paused, raw_upstream, require, sse, text_of

V1 = "/v1/chat/completions"
STREAM = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ANSWER = [sse(chunk("Hel", role="assistant")), sse(chunk("lo")), sse(chunk(finish_reason="stop")), sse("[DONE]")]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def gzip_pieces(pieces: list[bytes], wbits: int = 31) -> list[bytes]:
    """Each piece compressed and flushed on its own, as a streaming server sends them."""
    z = zlib.compressobj(wbits=wbits)
    out = [z.compress(p) + z.flush(zlib.Z_SYNC_FLUSH) for p in pieces]
    out[-1] += z.flush()
    return out


async def v1_datas(relay: Any) -> list[str]:
    resp = await relay.post(V1, json=STREAM)
    assert resp.status == 200, await resp.text()
    return await SSEClient(resp).all_data()


@pytest.mark.parametrize("coding,wbits", [("gzip", 31), ("deflate", 15)])
async def test_a_compressed_stream_is_relayed_as_the_upstream_meant_it(make_relay: Any, coding: str,
                                                                       wbits: int) -> None:
    script = (SSE_HEAD + f"Content-Encoding: {coding}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
              + chunked(*gzip_pieces(ANSWER, wbits)) + b"0\r\n\r\n")
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        datas = await v1_datas(relay)
        assert [d.encode() for d in datas] == [p[len(b"data: "):-2] for p in ANSWER]
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
        assert text_of(events) == "Hello" and events[-1]["type"] == "done"


async def test_a_corrupt_compressed_stream_is_an_honest_end(make_relay: Any) -> None:
    good = gzip_pieces(ANSWER[:1] + ANSWER[1:])
    script = (SSE_HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunked(good[0], b"\xff" * 40) + b"0\r\n\r\n")
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
        assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_ended", events


async def test_an_unknown_content_coding_is_refused_before_anything_is_relayed(make_relay: Any) -> None:
    script = SSE_HEAD + b"Content-Encoding: zstd\r\nContent-Length: 4\r\n\r\nabcd"
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502
        assert "content coding" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("framing", ["content-length", "until-close", "http/1.0", "interim-103", "trailers"])
async def test_every_body_framing_carries_the_same_stream(make_relay: Any, framing: str) -> None:
    body = b"".join(ANSWER)
    script = {
        "content-length": SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "until-close": SSE_HEAD + b"\r\n" + body,
        "http/1.0": SSE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n" + body,
        "interim-103": (b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                        + SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*ANSWER) + b"0\r\n\r\n"),
        "trailers": (SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*ANSWER)
                     + b"0;ext=1\r\nX-Trailer: yes\r\n\r\n"),
    }[framing]
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        datas = await v1_datas(relay)
        assert datas[-1] == "[DONE]" and "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                                                 for d in datas[:-1]) == "Hello"


@pytest.mark.parametrize("head", [
    pytest.param(b"HTTP/2 200\r\n\r\n", id="not-http1"),
    pytest.param(SSE_HEAD + b"Bad Header\r\n\r\n", id="malformed-header"),
    pytest.param(SSE_HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", id="two-lengths"),
    pytest.param(SSE_HEAD + b"Content-Length: -1\r\n\r\n", id="negative-length"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", id="upgrade"),
])
async def test_a_broken_answer_head_is_a_clear_502(make_relay: Any, head: bytes) -> None:
    async with raw_upstream(head) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502
        assert "the upstream request failed" in (await resp.json())["error"]["message"]
        assert (await relay.get("/healthz")).status == 200


async def test_a_huge_head_is_refused_not_buffered(make_relay: Any) -> None:
    script = SSE_HEAD + b"X-Pad: " + b"a" * (80 * 1024) + b"\r\n\r\n"
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502
        assert "headers are too large" in (await resp.json())["error"]["message"]


async def test_a_non_streamed_answer_and_an_error_body_in_gzip_are_read(make_relay: Any) -> None:
    answer = json.dumps({"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}).encode()
    packed = gzip_pieces([answer])[0]
    script = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
              b"Content-Length: %d\r\n\r\n" % len(packed) + packed)
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json={**STREAM, "stream": False})
        assert resp.status == 200 and await resp.read() == answer
    error = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
    packed = gzip_pieces([error])[0]
    script = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
              b"Retry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(packed) + b"0\r\n\r\n")
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 429 and (await resp.json())["error"]["message"] == "slow down"


# -- TLS -------------------------------------------------------------------------------------

def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1 (openssl, as an operator would)."""
    require(shutil.which("openssl") is not None, "openssl is not installed")
    ca_key, ca, key, csr, cert = (where / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = where / "ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=relay test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
        str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


@asynccontextmanager
async def tls_upstream(fake: FakeUpstream, cert: Path, key: Path) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_an_https_upstream_is_verified_against_the_trust_store(
        make_relay: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = make_certificates(tmp_path)
    fake = FakeUpstream()
    async with tls_upstream(fake, cert, key) as url:
        # Not trusted: the system's store does not know the private CA.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing.pem"))
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
        assert message.startswith("could not connect to the upstream (TLS: ") and "127.0.0.1" not in message
        assert fake.calls == 0
        # Trusted (SSL_CERT_FILE, the way an operator adds a private CA): the answer streams.
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        relay = await make_relay(upstream=url)
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
        assert text_of(events) == "Hello, world!" and events[-1]["type"] == "done"
        assert fake.headers[-1]["Authorization"].startswith("Bearer ")


# -- The bound on open connections, and the push path ----------------------------------------

async def test_pool_limit_bounds_open_answers_and_a_slot_frees_when_one_ends(
        make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("first", "second")
    relay = await make_relay(pool_limit=1, connect_timeout=0.3)
    holding = await relay.post(V1, json=STREAM)
    held = SSEClient(holding)
    assert json.loads((await held.next()).data)["choices"][0]["delta"]["content"] == "first"  # type: ignore[union-attr]
    # The one slot is taken: the next request waits for it, within the connect timeout.
    resp = await relay.post(V1, json=STREAM)
    assert resp.status == 504 or resp.status == 502
    assert "within the connect timeout" in (await resp.json())["error"]["message"]
    assert upstream.calls == 1
    upstream.release.set()
    assert (await held.all_data())[-1] == "[DONE]"
    # Its connection closed, its slot is free again.
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1]["type"] == "done" and upstream.calls == 2


async def test_everything_that_has_arrived_is_taken_in_one_step(
        make_relay: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fifty chunks written at once reach the generation as one batch, not fifty wake-ups of the
    producer (each wake-up resumes its task: the per-event cost bench/RESULTS.md counts)."""
    from relay.core.generation import Generation

    batches: list[int] = []
    original = Generation._take

    def take(self: Generation, chunks: Any) -> None:
        batches.append(len(chunks))
        original(self, chunks)

    monkeypatch.setattr(Generation, "_take", take)
    parts = [sse(chunk("x", role="assistant"))] + [sse(chunk("x")) for _ in range(48)]
    parts += [sse(chunk(finish_reason="stop")), sse("[DONE]")]
    script = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*parts) + b"0\r\n\r\n"
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert text_of(events) == "x" * 49 and events[-1]["type"] == "done"
    assert batches == [50], batches


@pytest.mark.parametrize("line,size,ends", [
    ("chunk-size", 100, "done"), ("trailer", 100, "done"),
    # llhttp reads past a chunk extension without keeping it: nothing is buffered, the answer ends.
    ("chunk-size", 9 * 1024, "done"),
    # aiohttp refuses the trailer and closes the connection but does not end the body it was
    # reading: the idle timeout ends the answer, honestly (docs/architecture.md).
    ("trailer", 9 * 1024, "upstream_timeout"),
])
async def test_an_overlong_framing_line_ends_the_stream_instead_of_being_buffered(
        make_relay: Any, line: str, size: int, ends: str) -> None:
    # The whole answer but [DONE] (its finish is enough to count as finished); once the client
    # has it, the line.
    pad = b"x" * size
    tail = (b"1;" + pad + b"\r\n\n\r\n0\r\n\r\n" if line == "chunk-size"
            else b"0\r\nX-Trailer: " + pad + b"\r\n\r\n")
    relayed = asyncio.Event()
    script: list[bytes | asyncio.Event] = [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*ANSWER[:3]),
                                           relayed, tail]
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url, idle_timeout=2)
        client = SSEClient(await relay.post("/chat", json={"prompt": "hi"}))
        events = []
        while text_of(events) != "Hello":
            event = await client.next_json()
            assert event is not None
            events.append(event)
        relayed.set()
        events += await client.all()
        assert text_of(events) == "Hello"
        assert (events[-1]["type"] if ends == "done" else events[-1]["code"]) == ends, events
