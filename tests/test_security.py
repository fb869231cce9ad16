"""The bad-input battery: every hostile or broken request gets the right 4xx with a message that
names the problem; afterwards the same relay still streams a normal chat, and the upstream key
appears in no answer and no log line.

The relay under test is configured the way a public one would be: tokens, an allowlist of
models, an output-token ceiling, a rate limit, per-client stream limit and the page's files.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, RelayFactory, SSEClient, chunk, sse, text_of
from relay.http.appkeys import ACCESS

TOKEN_A = "tok-A-" + "a" * 26  # the main client
TOKEN_B = "tok-B-" + "b" * 26  # another client
TOKEN_C = "tok-C-" + "c" * 26  # the one that bursts
TOKEN_D = "tok-D-" + "d" * 26  # the one that is revoked
TOKENS = (TOKEN_A, TOKEN_B, TOKEN_C, TOKEN_D)
SECRET_TEXT = "TOP-SECRET-FILE-CONTENT"
RATE = 20
PER_CLIENT = 2


@dataclass
class Answer:
    status: int
    text: str
    headers: dict[str, str]


@dataclass
class Ctx:
    client: Any
    upstream: FakeUpstream
    tokens_file: Path

    async def http(self, method: str, path: str, *, body: bytes | None = None, token: str | None = TOKEN_A,
                   headers: dict[str, str] | None = None) -> Answer:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        resp = await self.client.request(method, path, data=io.BytesIO(body) if body is not None else None,
                                         headers=sent)
        return Answer(resp.status, await resp.text(), dict(resp.headers))

    async def raw(self, request: bytes) -> Answer:
        """One request on its own connection, bytes as given (what no well-behaved client can send)."""
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(self.client.host, self.client.port)
            try:
                writer.write(request)
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return Answer(int(lines[0].split()[1]), body.decode("utf-8", "replace"), headers)

    async def start_stream(self, token: str) -> str:
        resp = await self.client.post("/chat", json={"prompt": "mine"}, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json"})
        assert resp.status == 201
        stream_id: str = (await resp.json())["id"]
        return stream_id


Case = Callable[[Ctx], Awaitable[Answer]]


def http(method: str, path: str, body: bytes | str | None = None, *, token: str | None = TOKEN_A,
         headers: dict[str, str] | None = None) -> Case:
    data = body.encode() if isinstance(body, str) else body
    return lambda ctx: ctx.http(method, path, body=data, token=token, headers=headers)


def raw(first_line: str, *headers: str, tail: bytes = b"") -> Case:
    def run(ctx: Ctx) -> Awaitable[Answer]:
        lines = [first_line, f"Host: 127.0.0.1:{ctx.client.port}", f"Authorization: Bearer {TOKEN_A}",
                 "Connection: close", *headers]
        return ctx.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + tail)
    return run


def chat(obj: Any) -> Case:
    return http("POST", "/chat", json.dumps(obj))


def v1(obj: Any) -> Case:
    return http("POST", "/v1/chat/completions",
                json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **obj}))


async def revoked_token(ctx: Ctx) -> Answer:
    assert (await ctx.http("GET", "/v1/models", token=TOKEN_D)).status == 200
    ctx.tokens_file.write_text("\n".join(t for t in TOKENS if t != TOKEN_D) + "\n")
    assert ctx.client.app[ACCESS].reload()  # what the SIGHUP handler calls (tests/test_access.py sends one)
    return await ctx.http("POST", "/chat", body=b'{"prompt": "x"}', token=TOKEN_D)


async def other_tokens_stream_get(ctx: Ctx) -> Answer:
    return await ctx.http("GET", f"/chat/{await ctx.start_stream(TOKEN_B)}")


async def other_tokens_stream_delete(ctx: Ctx) -> Answer:
    return await ctx.http("DELETE", f"/chat/{await ctx.start_stream(TOKEN_B)}")


async def other_tokens_stream_resume(ctx: Ctx) -> Answer:
    stream_id = await ctx.start_stream(TOKEN_B)
    return await ctx.http("GET", "/chat", headers={"Last-Event-ID": f"{stream_id}.0"})


async def stream_without_token(ctx: Ctx) -> Answer:
    return await ctx.http("GET", f"/chat/{await ctx.start_stream(TOKEN_A)}", token=None)


async def tampered_events_url(ctx: Ctx) -> Answer:
    stream_id = await ctx.start_stream(TOKEN_A)
    url = ctx.client.app[ACCESS].events_url(stream_id, _owner(TOKEN_A))
    return await ctx.http("GET", url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB"), token=None)


async def expired_events_url(ctx: Ctx) -> Answer:
    stream_id = await ctx.start_stream(TOKEN_A)
    url = ctx.client.app[ACCESS].events_url(stream_id, _owner(TOKEN_A), now=time.time() - 100_000)
    return await ctx.http("GET", url, token=None)


async def events_url_of_another_stream(ctx: Ctx) -> Answer:
    first, second = await ctx.start_stream(TOKEN_A), await ctx.start_stream(TOKEN_A)
    url = ctx.client.app[ACCESS].events_url(first, _owner(TOKEN_A))
    return await ctx.http("GET", url.replace(first, second), token=None)


async def burst_over_rate_limit(ctx: Ctx) -> Answer:
    for _ in range(RATE):
        assert (await ctx.http("GET", "/v1/models", token=TOKEN_C)).status == 200
    return await ctx.http("POST", "/chat", body=b'{"prompt": "one too many"}', token=TOKEN_C)


async def too_many_streams_at_once(ctx: Ctx) -> Answer:
    ctx.upstream.behaviour = _held
    for _ in range(PER_CLIENT):
        await ctx.start_stream(TOKEN_C)
    answer = await ctx.http("POST", "/chat", body=b'{"prompt": "a third"}', token=TOKEN_C)
    ctx.upstream.behaviour = None
    ctx.upstream.release.set()
    return answer


async def _held(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
    resp = await fake.start_stream(request)
    await fake.send(resp, sse(chunk("", role="assistant")))
    await fake.release.wait()
    await fake.send(resp, sse(chunk("ok", finish_reason="stop")))
    return resp


def _owner(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


BIG_HEADER = "X-Big: " + "y" * 9000
BATTERY = [
    # -- the body: JSON, types, sizes --------------------------------------------------------
    pytest.param(http("POST", "/chat", "{not json"), 400, "not valid JSON", id="malformed-json"),
    pytest.param(http("POST", "/chat", '{"prompt": "hel'), 400, "not valid JSON", id="truncated-json"),
    pytest.param(http("POST", "/chat", ""), 400, "body is empty", id="empty-body"),
    pytest.param(http("POST", "/chat", "[1, 2]"), 400, "must be a JSON object", id="array-body"),
    pytest.param(chat({"prompt": 5}), 400, "'prompt' must be a non-empty string", id="prompt-wrong-type"),
    pytest.param(chat({"messages": {"role": "user"}}), 400, "'messages' must be a list", id="messages-wrong-type"),
    pytest.param(chat({"prompt": "x", "temperature": "hot"}), 400, "'temperature'", id="temperature-wrong-type"),
    pytest.param(http("POST", "/chat", "[" * 100_000 + "]" * 100_000), 400, "nested too deeply",
                 id="deeply-nested-json"),
    pytest.param(chat({"prompt": "x" * 500_000}), 400, "at most 400000 (--max-chars)", id="huge-string"),
    pytest.param(chat({"prompt": "x" * (2 * 1024 * 1024)}), 413, "larger than the limit", id="oversized-body"),
    pytest.param(http("POST", "/chat", b'{"prompt": "\xff\xfe"}'), 400, "not valid UTF-8", id="invalid-utf8"),
    pytest.param(http("POST", "/chat", b'{"prompt": "a\x00b"}'), 400, "not valid JSON", id="nul-byte-in-body"),
    pytest.param(chat({"messages": [{"role": "user", "content": "x"}] * 10_000}), 400,
                 "has 10000 messages; this relay accepts at most 500", id="ten-thousand-messages"),
    pytest.param(v1({"messages": [{"role": "user", "content": "x"}] * 10_000}), 400, "(--max-messages)",
                 id="ten-thousand-messages-v1"),
    pytest.param(chat({"prompt": "x", "max_tokens": -5}), 400, "'max_tokens' must be a positive integer",
                 id="negative-max-tokens"),
    pytest.param(chat({"prompt": "x", "max_tokens": 10**12}), 400, "'max_tokens' must be at most 4096",
                 id="huge-max-tokens"),
    pytest.param(v1({"max_completion_tokens": 10**30}), 400, "'max_completion_tokens' must be at most 4096",
                 id="huge-max-completion-tokens-v1"),
    pytest.param(v1({"max_tokens": 0}), 400, "'max_tokens' must be a positive integer", id="zero-max-tokens-v1"),
    pytest.param(v1({"n": 50}), 400, "'n' must be at most 4", id="huge-n-v1"),
    pytest.param(chat({"prompt": "x", "model": "gpt-expensive"}), 400, "not available on this relay",
                 id="disallowed-model"),
    pytest.param(v1({"model": "gpt-expensive"}), 400, "not available on this relay", id="disallowed-model-v1"),
    pytest.param(chat({"prompt": "x", "frobnicate": 1}), 400, "'frobnicate' is not a supported field",
                 id="unknown-field"),
    # -- CR/LF and NUL wherever a value could reach a header or an SSE field ----------------
    pytest.param(chat({"prompt": "x", "model": "fake-model\r\nX-Injected: 1"}), 400, "without control characters",
                 id="crlf-in-model"),
    pytest.param(v1({"model": "fake-model\ndata: forged"}), 400, "without control characters", id="lf-in-model-v1"),
    pytest.param(chat({"prompt": "x", "model": "fake\u0000model"}), 400, "without control characters",
                 id="nul-in-model"),
    pytest.param(http("GET", "/chat?prompt=x&lastEventId=abc%0D%0Aevent:%20forged"), 400,
                 "Last-Event-ID is not an event id", id="crlf-in-lastEventId-query"),
    pytest.param(raw("GET /chat?prompt=x HTTP/1.1", "Last-Event-ID: abc\rdata: forged"), 400,
                 "after header value", id="cr-in-last-event-id-header"),
    pytest.param(http("GET", "/chat/abc%0D%0Aevent:%20x"), 404, "no such stream", id="crlf-in-stream-id"),
    pytest.param(http("GET", "/chat", headers={"Last-Event-ID": "../../etc/passwd"}), 400,
                 "Last-Event-ID is not an event id", id="junk-last-event-id"),
    # -- /static/: traversal and listing ------------------------------------------------------
    pytest.param(raw("GET /static/..%2fsecret.txt HTTP/1.1"), 404, "no such file", id="static-encoded-dotdot"),
    pytest.param(raw("GET /static/%2e%2e/secret.txt HTTP/1.1"), 404, "no such file", id="static-encoded-dots"),
    pytest.param(raw("GET /static/%252e%252e%252fsecret.txt HTTP/1.1"), 404, "no such file",
                 id="static-double-encoded"),
    pytest.param(raw("GET /static/..\\secret.txt HTTP/1.1"), 404, "no such file", id="static-backslash"),
    pytest.param(raw("GET /static/..%5csecret.txt HTTP/1.1"), 404, "no such file", id="static-encoded-backslash"),
    pytest.param(raw("GET /static/../secret.txt HTTP/1.1"), 404, "no such file", id="static-plain-dotdot"),
    pytest.param(raw("GET /static/link.txt HTTP/1.1"), 404, "no such file", id="static-symlink-out"),
    pytest.param(raw("GET /static/ HTTP/1.1"), 404, "no such file", id="static-directory-listing"),
    pytest.param(raw("GET /static/sub HTTP/1.1"), 404, "no such file", id="static-subdirectory"),
    pytest.param(raw("GET /static/.env HTTP/1.1"), 404, "no such file", id="static-dotfile"),
    # -- header and request-line sizes, methods -----------------------------------------------
    pytest.param(raw("GET /chat?prompt=x HTTP/1.1", BIG_HEADER), 400, "Got more than 8190 bytes",
                 id="oversized-header"),
    pytest.param(raw("GET /chat?prompt=x HTTP/1.1", *(f"X-{i}: 1" for i in range(200))), 400,
                 "Too many headers", id="too-many-headers"),
    pytest.param(raw("GET /chat?prompt=" + "x" * 9000 + " HTTP/1.1"), 400, "Got more than 8190 bytes",
                 id="oversized-query-string"),
    pytest.param(http("PUT", "/chat", "{}"), 405, "the method PUT is not allowed here; allowed: GET, POST",
                 id="put-chat"),
    pytest.param(http("PATCH", "/chat/some-id"), 405, "the method PATCH is not allowed", id="patch-stream"),
    pytest.param(http("GET", "/v1/chat/completions"), 405, "allowed: POST", id="get-completions"),
    pytest.param(raw("TRACE /chat HTTP/1.1"), 405, "the method TRACE is not allowed", id="trace"),
    # -- tokens ---------------------------------------------------------------------------------
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', token=None), 401, "needs an access token",
                 id="missing-token"),
    pytest.param(http("POST", "/v1/chat/completions", "{}", token=None), 401,
                 "needs an access token", id="missing-token-v1"),
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', token="tok-wrong-" + "z" * 20), 401,
                 "access token is not valid", id="wrong-token"),
    pytest.param(http("GET", "/v1/models", token="tok-wrong-" + "z" * 20), 401, "access token is not valid",
                 id="wrong-token-v1"),
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', token=None,
                      headers={"Authorization": f"Basic {TOKEN_A}"}), 401, "needs an access token",
                 id="basic-instead-of-bearer"),
    pytest.param(http("GET", "/chat?prompt=hello", token=None), 401, "EventSource cannot send headers",
                 id="eventsource-get-without-token"),
    pytest.param(revoked_token, 401, "access token is not valid", id="revoked-token"),
    pytest.param(other_tokens_stream_get, 404, "no such stream", id="another-tokens-stream-get"),
    pytest.param(other_tokens_stream_delete, 404, "no such stream", id="another-tokens-stream-delete"),
    pytest.param(other_tokens_stream_resume, 404, "no such stream", id="another-tokens-stream-resume"),
    pytest.param(stream_without_token, 401, "needs an access token", id="stream-id-without-token"),
    pytest.param(tampered_events_url, 401, "events URL is not valid", id="tampered-events-url"),
    pytest.param(expired_events_url, 401, "events URL has expired", id="expired-events-url"),
    pytest.param(events_url_of_another_stream, 401, "events URL is not valid", id="events-url-of-another-stream"),
    # -- browsers: Origin, Host, cross-site -------------------------------------------------------
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', headers={"Origin": "https://evil.example"}), 403,
                 "origin are not allowed", id="foreign-origin"),
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', headers={"Origin": "null"}), 403,
                 "origin are not allowed", id="null-origin"),
    pytest.param(http("OPTIONS", "/chat", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"}), 403,
                 "origin are not allowed", id="foreign-preflight"),
    pytest.param(http("POST", "/chat", '{"prompt": "x"}', headers={"Host": "evil.example"}), 421,
                 "does not answer to that Host", id="foreign-host"),
    pytest.param(http("GET", "/", headers={"Host": "rebind.evil.example:8080"}), 421,
                 "does not answer to that Host", id="rebinding-host-on-page"),
    pytest.param(http("GET", "/chat?prompt=spend", token=None, headers={"Sec-Fetch-Site": "cross-site"}), 403,
                 "cross-site requests without an Origin", id="cross-site-get"),
    # -- volume -------------------------------------------------------------------------------------
    pytest.param(burst_over_rate_limit, 429, f"allows {RATE} per minute per client", id="burst-over-rate-limit"),
    pytest.param(too_many_streams_at_once, 429, "generations running", id="too-many-streams-at-once"),
]


@pytest.fixture
async def ctx(make_relay: RelayFactory, upstream: FakeUpstream, tmp_path: Path) -> Ctx:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# the relay's clients\n\n" + "\n".join(TOKENS) + "\n")
    (tmp_path / "secret.txt").write_text(SECRET_TEXT)
    web_root = tmp_path / "web"
    (web_root / "sub").mkdir(parents=True)
    (web_root / "index.html").write_text("<!doctype html><title>relay</title>")
    (web_root / "app.js").write_text("console.log('hi')")
    (web_root / ".env").write_text(SECRET_TEXT)
    (web_root / "link.txt").symlink_to(tmp_path / "secret.txt")
    client = await make_relay(tokens_file=tokens_file, web_root=web_root, models=("fake-model", "other-model"),
                              max_output_tokens=4096, rate_limit=RATE, max_streams_per_client=PER_CLIENT)
    return Ctx(client, upstream, tokens_file)


@pytest.mark.parametrize(("case", "status", "words"), BATTERY)
async def test_bad_request_gets_its_4xx_and_the_relay_serves_on_without_leaking(
        ctx: Ctx, caplog: pytest.LogCaptureFixture, case: Case, status: int, words: str) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await case(ctx)
    assert answer.status == status, answer.text
    assert words in answer.text
    if answer.headers.get("Content-Type", "").startswith("application/json"):
        assert set(json.loads(answer.text)["error"]) >= {"message", "type", "code"}
    assert SECRET_TEXT not in answer.text
    assert answer.headers.get("X-Content-Type-Options") == "nosniff" or answer.status == 400
    if status == 429:
        assert int(answer.headers["Retry-After"]) >= 1

    # The same relay still streams a normal chat, word for word.
    ok = await ctx.client.post("/chat", json={"prompt": "still serving?"},
                               headers={"Authorization": f"Bearer {TOKEN_A}"})
    assert ok.status == 200
    assert text_of(await SSEClient(ok).all()) == "Hello, world!"

    # The upstream key is in no answer and no log line; the tokens are in no log line.
    for where in (answer.text, json.dumps(answer.headers)):
        assert TEST_KEY not in where
    logged = "\n".join(logging.Formatter().format(r) for r in caplog.records)
    for secret in (TEST_KEY, *TOKENS):
        assert secret not in logged


def test_the_battery_has_at_least_forty_cases() -> None:
    assert len(BATTERY) >= 40
