"""The upstream on aiohttp's client, as it is deployed: connections reused after a clean answer and
closed after a cancel, a real forward proxy in front of a TLS upstream with a private CA, the key
kept out of everything an upstream sends back, and bounded whatever it sends."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, chunked, paused, raw_upstream, require, sse, text_of
from test_upstream_http import ANSWER, SSE_HEAD, STREAM, V1, gzip_pieces, make_certificates, tls_upstream

from relay.run.cli import config_from_args
from relay.run.flags import build_parser
from relay.config import ConfigError


def leaks(text: str) -> bool:
    """Whether ``text`` holds the key or any eight characters of it, in any letter case."""
    low, key = text.lower(), TEST_KEY.lower()
    return any(key[i:i + 8] in low for i in range(len(key) - 7))


# -- connections ---------------------------------------------------------------------------

async def test_answers_in_sequence_reuse_one_upstream_connection(make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay()
    for _ in range(3):
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
        assert events[-1]["type"] == "done"
        assert (await SSEClient(await relay.post(V1, json=STREAM)).all_data())[-1] == "[DONE]"
    assert upstream.calls == 6
    assert len(set(upstream.peers)) == 1, upstream.peers


async def test_a_cancelled_answer_closes_its_connection_instead_of_reusing_it(
        make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("first", "second")
    relay = await make_relay()
    resp = await relay.post(V1, json=STREAM)
    client = SSEClient(resp)
    assert json.loads((await client.next()).data)["choices"][0]["delta"]["content"] == "first"  # type: ignore[union-attr]
    resp.close()  # the client leaves: the upstream must see its connection close (the billing stops)
    async with asyncio.timeout(10):
        await upstream.closed.wait()
    upstream.release.set()
    assert (await SSEClient(await relay.post(V1, json=STREAM)).all_data())[-1] == "[DONE]"
    assert len(set(upstream.peers)) == 2, upstream.peers


# -- the key, whatever the upstream sends ----------------------------------------------------

@pytest.mark.parametrize("header", [
    pytest.param(b"Content-Type: text/html; charset=" + TEST_KEY.lower().encode() + b"\r\n", id="content-type"),
    pytest.param(SSE_HEAD[len(b"HTTP/1.1 200 OK\r\n"):] + b"Content-Encoding: x-" + TEST_KEY.upper().encode() + b"\r\n",
                 id="content-encoding"),
])
async def test_the_key_never_leaves_through_an_answers_headers(
        make_relay: Any, header: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    script = b"HTTP/1.1 200 OK\r\n" + header + b"Content-Length: 4\r\n\r\nabcd"
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502
        text = await resp.text()
        assert "upstream" in text and not leaks(text), text
        chat = await (await relay.post("/chat", json={"prompt": "hi"})).text()
        assert "error" in chat and not leaks(chat), chat
        state = await (await relay.get("/v1/upstreams")).text()
        assert "cooling" in state and not leaks(state), state
    assert not leaks(caplog.text), caplog.text


async def test_a_chunk_that_echoes_the_key_in_any_field_has_it_blanked(make_relay: Any) -> None:
    echo = {**chunk("Hi", role="assistant"), "id": TEST_KEY.upper(), "model": TEST_KEY,
            "system_fingerprint": f"fp_{TEST_KEY.swapcase()}"}
    body = chunked(sse(echo), sse(chunk(finish_reason="stop")), sse("[DONE]")) + b"0\r\n\r\n"
    async with raw_upstream(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body) as url:
        relay = await make_relay(upstream=url)
        datas = await SSEClient(await relay.post(V1, json=STREAM)).all_data()
        assert datas[-1] == "[DONE]" and not any(leaks(d) for d in datas), datas
        first = json.loads(datas[0])
        assert first["id"] == "[redacted]" and first["choices"][0]["delta"]["content"] == "Hi"
        events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
        assert text_of(events) == "Hi" and not leaks(json.dumps(events))


@pytest.mark.parametrize("quoted", [
    f"{TEST_KEY[:12]}...{TEST_KEY[-10:]}", f"{TEST_KEY[:12].upper()}***", f"key ending {TEST_KEY[-9:]}",
], ids=["ellipsis", "prefix-upper", "suffix"])
async def test_a_piece_of_the_key_quoted_in_an_error_is_blanked(
        make_relay: Any, upstream: FakeUpstream, quoted: str, caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web

    async def fail(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"Incorrect API key provided: {quoted}",
                                            "type": "invalid_request_error"}}, status=500)
    upstream.behaviour = fail
    relay = await make_relay()
    resp = await relay.post(V1, json=STREAM)
    text = await resp.text()
    assert resp.status == 500 and "Incorrect API key provided" in text and not leaks(text), text
    chat = await (await relay.post("/chat", json={"prompt": "hi"})).text()
    assert "Incorrect API key provided" in chat and not leaks(chat), chat
    assert not leaks(caplog.text)


# -- bounded, whatever the upstream sends ------------------------------------------------------

async def test_a_gzip_bomb_in_the_heads_read_is_inflated_in_bounded_memory(make_relay: Any) -> None:
    z = zlib.compressobj(9, wbits=31)
    block = b"a" * (1024 * 1024)
    packed = z.compress(b"data: ") + b"".join(z.compress(block) for _ in range(64)) + z.flush()
    assert len(packed) < 256 * 1024  # 64 MiB inflated, all of it in the head's read
    script = SSE_HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        tracemalloc.start()
        try:
            events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert events[-1]["type"] == "error" and "oversized event" in events[-1]["message"], events[-1]
        assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
        assert (await relay.get("/healthz")).status == 200


@pytest.mark.parametrize("coding", ["raw-deflate", "multi-member-gzip"])
async def test_every_deflate_form_is_read_whole(make_relay: Any, coding: str) -> None:
    if coding == "raw-deflate":
        head, body = b"Content-Encoding: deflate\r\n", b"".join(gzip_pieces(ANSWER, wbits=-15))
    else:
        # Each event its own gzip member, one after another in one body (RFC 1952 allows it).
        head, body = b"Content-Encoding: gzip\r\n", b"".join(gzip_pieces([piece])[0] for piece in ANSWER)
    script = SSE_HEAD + head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body) + b"0\r\n\r\n"
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        datas = await SSEClient(await relay.post(V1, json=STREAM)).all_data()
        assert [d.encode() for d in datas] == [p[len(b"data: "):-2] for p in ANSWER]


async def test_a_204_with_a_body_is_refused_not_relayed(make_relay: Any) -> None:
    body = b"".join(ANSWER)
    script = b"HTTP/1.1 204 No Content\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(
        body) + body
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post(V1, json=STREAM)
        assert resp.status == 502  # llhttp refuses a body after 204 as a broken answer
        assert "the upstream request failed" in (await resp.json())["error"]["message"]


# -- a real forward proxy ----------------------------------------------------------------------

def tunnels(log: Path) -> int:
    """CONNECT requests tinyproxy took (its log names each: "Request (file descriptor N): CONNECT ...")."""
    return log.read_text().count("): CONNECT ") if log.exists() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _tinyproxy(where: Path, auth: tuple[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    require(shutil.which("tinyproxy") is not None, "tinyproxy is not installed (apt-get install tinyproxy)")
    port = _free_port()
    log = where / "tinyproxy.log"
    conf = where / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{log}\"\nLogLevel Connect\n"
                    f"MaxClients 16\nAllow 127.0.0.1\nBasicAuth {auth[0]} {auth[1]}\n"
                    f"PidFile \"{where / 'tinyproxy.pid'}\"\n")
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert proc.poll() is None, "tinyproxy did not start"
                await asyncio.sleep(0.05)  # polling a port that is not open yet: no event to await
                continue
            writer.close()
            break
    return proc, port


async def test_an_answer_through_a_forward_proxy_to_a_tls_upstream_with_a_private_ca(
        make_relay: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ca, cert, key = make_certificates(tmp_path)
    fake = FakeUpstream()
    auth = ("relayuser", "proxy-Pa55word-xyz")
    proc, port = await _tinyproxy(tmp_path, auth)
    try:
        async with tls_upstream(fake, cert, key) as url:
            creds = tmp_path / "proxy-auth"
            creds.write_text(f"{auth[0]}:{auth[1]}\n")
            args = build_parser().parse_args(["serve", "--upstream", url, "--upstream-proxy",
                                              f"http://127.0.0.1:{port}", "--upstream-proxy-auth-file", str(creds),
                                              "--upstream-ca-file", str(ca)])
            settings = config_from_args(args, {"OPENAI_API_KEY": TEST_KEY})
            assert settings.upstream_proxy_auth == auth
            relay = await make_relay(upstream=url, upstream_proxy=settings.upstream_proxy,
                                     upstream_proxy_auth=settings.upstream_proxy_auth, upstream_ca_file=ca)
            for _ in range(2):
                events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
                assert text_of(events) == "Hello, world!" and events[-1]["type"] == "done"
            assert fake.calls == 2 and len(set(fake.peers)) == 1  # one tunnel, reused
            # Wrong credentials: the proxy's refusal, in words that name no password.
            relay = await make_relay(upstream=url, upstream_proxy=settings.upstream_proxy,
                                     upstream_proxy_auth=("relayuser", "wrong-password-123"), upstream_ca_file=ca)
            resp = await relay.post(V1, json=STREAM)
            assert resp.status == 502
            assert "proxy refused the connection (HTTP 40" in (await resp.json())["error"]["message"]
            assert fake.calls == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert tunnels(tmp_path / "tinyproxy.log") >= 1
    assert auth[1] not in caplog.text and "wrong-password-123" not in caplog.text


def test_a_proxy_url_with_credentials_is_refused_without_repeating_them() -> None:
    args = build_parser().parse_args(["serve", "--upstream-proxy", "http://user:s3cret-pw@proxy:3128"])
    with pytest.raises(ConfigError) as exc:
        config_from_args(args, {})
    assert "s3cret-pw" not in str(exc.value) and "--upstream-proxy-auth-file" in str(exc.value)


async def test_the_environments_proxy_is_used_only_when_the_operator_opts_in(
        make_relay: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = make_certificates(tmp_path)
    fake = FakeUpstream()
    auth = ("envuser", "env-Pa55word-xyz")
    proc, port = await _tinyproxy(tmp_path, auth)
    log = tmp_path / "tinyproxy.log"
    try:
        async with tls_upstream(fake, cert, key) as url:
            monkeypatch.setenv("HTTPS_PROXY", f"http://{auth[0]}:{auth[1]}@127.0.0.1:{port}")
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            # Not opted in: the environment is ignored, the upstream is reached directly.
            relay = await make_relay(upstream=url, upstream_ca_file=ca)
            assert (await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all())[-1]["type"] == "done"
            assert tunnels(log) == 0
            # Opted in: through the proxy the environment names, with its credentials.
            relay = await make_relay(upstream=url, upstream_ca_file=ca, upstream_trust_env=True)
            assert (await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all())[-1]["type"] == "done"
            connects = tunnels(log)
            assert connects >= 1
            # NO_PROXY names the upstream: directly again.
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            relay = await make_relay(upstream=url, upstream_ca_file=ca, upstream_trust_env=True)
            assert (await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all())[-1]["type"] == "done"
            assert tunnels(log) == connects
            assert fake.calls == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_client_certificate_per_upstream_for_a_server_that_requires_one(
        aiohttp_client: Any, tmp_path: Path) -> None:
    import ssl

    from aiohttp import web

    from relay.config import Config
    from relay.http.app import make_app
    from relay.upstream.config import parse_upstreams

    ca, cert, key = make_certificates(tmp_path)
    fake = FakeUpstream()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=str(ca))
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no answer
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        entries = [{"name": "mtls", "url": url, "models": ["m"], "ca_file": str(ca)}]
        without = parse_upstreams(entries, {})
        # The server's own certificate and key stand in for a client certificate the CA signed.
        with_cert = parse_upstreams([{**entries[0], "client_cert": str(cert), "client_key": str(key)}], {})
        for specs, ends in ((without, "error"), (with_cert, "done")):
            relay = await aiohttp_client(make_app(Config(upstreams=specs, model="m", rate_limit=0)))
            events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
            assert events[-1]["type"] == ends, events
        assert fake.calls == 1
    finally:
        await runner.cleanup()
