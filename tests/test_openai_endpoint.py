"""/v1/chat/completions on the wire: parameters, errors, logging, keepalives, curl and httpx-sse."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
from typing import Any

import httpx
import pytest
from aiohttp import web
from httpx_sse import aconnect_sse

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, paused, require, sse, tokens, wait_for

Client = Any
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
STREAM = {"model": "fake-model", "messages": MESSAGES, "stream": True}


def silent_before_headers() -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await fake.release.wait()
        return await tokens(["late"])(request, fake)
    return run


async def test_every_documented_parameter_is_forwarded_as_sent(relay: Client, upstream: FakeUpstream) -> None:
    body: dict[str, Any] = {
        **STREAM, "stream_options": {"include_usage": True}, "temperature": 0.2, "top_p": 0.9, "n": 1,
        "stop": ["\n\n"], "max_tokens": 50, "max_completion_tokens": 60, "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "logit_bias": {"50256": -100}, "seed": 7, "logprobs": True, "top_logprobs": 2,
        "user": "u-1", "metadata": {"k": "v"}, "store": False, "reasoning_effort": "low",
        "modalities": ["text"], "prediction": {"type": "content", "content": "x"}, "service_tier": "auto",
        "response_format": {"type": "json_object"}, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    resp = await relay.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer client-key"})
    assert resp.status == 200
    await resp.read()
    assert upstream.requests[0] == body
    # Upstream, only the relay's own key travels; the client's credentials never do.
    assert upstream.headers[0]["Authorization"] == f"Bearer {TEST_KEY}"


@pytest.mark.parametrize("field", ["top_k", "api_key", "base_url"])
async def test_under_strict_fields_an_unknown_field_is_a_400_in_openai_shape_naming_it(
        make_relay: Any, upstream: FakeUpstream, field: str) -> None:
    relay = await make_relay(strict_fields=True)
    resp = await relay.post("/v1/chat/completions", json={**STREAM, field: 1})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"
    assert upstream.calls == 0


async def test_chat_route_also_rejects_a_model_outside_the_allowlist(make_relay: Any,
                                                                    upstream: FakeUpstream) -> None:
    relay = await make_relay(models=("fake-model",))
    resp = await relay.post("/chat", json={"prompt": "hi", "model": "gpt-expensive"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "model" and "gpt-expensive" in error["message"]
    assert upstream.calls == 0


async def test_models_without_allowlist_or_default_lists_the_upstreams_own(make_relay: Any,
                                                                           upstream: FakeUpstream) -> None:
    relay = await make_relay(model=None)
    resp = await relay.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["fake-model"]  # the fake's GET /v1/models
    upstream.models_status = 500  # cached: the second listing does not ask again
    resp = await relay.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["fake-model"]
    assert len(upstream.models_headers) == 1 and upstream.models_headers[0]["Authorization"] == f"Bearer {TEST_KEY}"


async def test_relay_asks_for_no_usage_when_stream_usage_is_off(make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(stream_usage=False)
    await (await relay.post("/v1/chat/completions", json=STREAM)).read()
    assert "stream_options" not in upstream.requests[0]


async def test_unreachable_upstream_is_a_502_saying_so(make_relay: Any) -> None:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = await make_relay(upstream=f"http://127.0.0.1:{port}/v1")
    resp = await relay.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert "could not connect to the upstream" in error["message"] and error["type"] == "server_error"


async def test_upstream_silent_past_first_token_timeout_is_a_504(make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = silent_before_headers()
    relay = await make_relay(first_token_timeout=0.1, keepalive=60)
    resp = await relay.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 504
    assert "first-token timeout" in (await resp.json())["error"]["message"]


async def test_client_leaving_before_the_upstream_answered_closes_the_upstream(
        make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = silent_before_headers()
    relay = await make_relay(keepalive=60)
    request = asyncio.create_task(relay.post("/v1/chat/completions", json=STREAM))
    await wait_for(lambda: upstream.calls == 1)
    request.cancel()
    await asyncio.wait_for(upstream.closed.wait(), 10)
    assert not upstream.release.is_set()
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_one_log_line_per_request_with_counts_and_never_the_key(relay: Client, upstream: FakeUpstream,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await (await relay.post("/v1/chat/completions", json=STREAM)).read()

    async def leaky(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        # A (hypothetical) upstream that echoes the key in an error: it must not reach anyone.
        return web.json_response({"error": {"message": f"bad request for key {TEST_KEY}", "type": "x"}},
                                 status=400)
    upstream.behaviour = leaky
    resp = await relay.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 400
    text = await resp.text()
    assert TEST_KEY not in text and "[redacted]" in text
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.generation"]
    assert len(lines) == 2
    assert "model=fake-model outcome=done" in lines[0] and "deltas=4" in lines[0] and "tokens=3+4" in lines[0]
    assert "outcome=upstream_error" in lines[1]
    assert TEST_KEY not in caplog.text


async def test_keepalives_on_v1_are_single_comment_lines_the_sdk_decoder_ignores(
        make_relay: Any, upstream: FakeUpstream) -> None:
    from openai._streaming import SSEDecoder as OpenAIDecoder

    upstream.behaviour = paused("first", " second")
    relay = await make_relay(keepalive=0.05)
    client = SSEClient(await relay.post("/v1/chat/completions", json=STREAM))
    while client.raw.count(b":keepalive\n") < 3:
        data = await client.resp.content.readany()
        assert data
        client.raw += data
    upstream.release.set()
    while data := await client.resp.content.readany():
        client.raw += data
    raw = bytes(client.raw)
    assert b":keepalive\n\n" not in raw
    events = list(OpenAIDecoder().iter_bytes(iter([raw])))
    assert [e.data for e in events][-1] == "[DONE]"
    assert [json.loads(e.data)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["first", " second"]


async def test_shutdown_ends_a_running_v1_stream_with_an_in_stream_error(relay: Client,
                                                                         upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("first", " second")
    client = SSEClient(await relay.post("/v1/chat/completions", json=STREAM))
    first = await client.next_json()
    assert first is not None and first["choices"][0]["delta"]["content"] == "first"
    await relay.app.shutdown()  # the on_shutdown hooks, as the server runs them
    rest = [e.data async for e in _events(client)]
    assert [json.loads(d)["error"]["code"] for d in rest] == ["shutdown"]
    await asyncio.wait_for(upstream.closed.wait(), 10)


async def _events(client: SSEClient) -> Any:
    while (event := await client.next()) is not None:
        yield event


def _gated(parts: list[str], gates: list[asyncio.Event]) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        for part, gate in zip(parts, gates):
            await gate.wait()
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


def _content(path: str, data: str) -> str | None:
    obj = json.loads(data)
    if path == "/chat":
        return obj.get("content") if obj.get("type") == "delta" else None
    choices = obj.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or None


@pytest.mark.parametrize(("path", "body"), [("/chat", {"prompt": "hi"}), ("/v1/chat/completions", STREAM)],
                         ids=["chat", "v1"])
async def test_curl_sees_each_delta_before_the_next_is_sent(relay: Client, upstream: FakeUpstream,
                                                            path: str, body: dict[str, Any]) -> None:
    curl = shutil.which("curl")
    require(curl is not None, "curl is not installed")
    assert curl is not None
    parts = ["alpha", " beta", " gamma", " delta"]
    gates = [asyncio.Event() for _ in parts]
    upstream.behaviour = _gated(parts, gates)
    proc = await asyncio.create_subprocess_exec(
        curl, "-N", "-s", "-X", "POST", "-H", "Content-Type: application/json", "--data", json.dumps(body),
        str(relay.make_url(path)), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        gates[0].set()
        for i, part in enumerate(parts):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "curl's output ended early"
                if line.startswith("data: ") and line != "data: [DONE]\n" and _content(path, line[6:]):
                    break
            assert _content(path, line[6:]) == part
            if i + 1 < len(gates):
                # Chunk i+1 is only sent once curl has printed chunk i.
                assert upstream.chunks_sent == i + 2
                gates[i + 1].set()
        await proc.stdout.read()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize(("path", "body"), [("/chat", {"prompt": "hi"}), ("/v1/chat/completions", STREAM)],
                         ids=["chat", "v1"])
async def test_httpx_sse_reads_the_stream(relay: Client, path: str, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as client:
        async with aconnect_sse(client, "POST", str(relay.make_url(path)), json=body) as source:
            assert source.response.status_code == 200
            data = [event.data async for event in source.aiter_sse()]
    assert "".join(_content(path, d) or "" for d in data if d != "[DONE]") == "Hello, world!"
    if path == "/chat":
        assert json.loads(data[-1])["type"] == "done"
    else:
        assert data[-1] == "[DONE]"


@pytest.mark.parametrize(("argv", "environ", "models"), [
    (["--allow-model", "a", "--allow-model", "b"], {}, ("a", "b")),
    ([], {"RELAY_MODELS": "a, b,"}, ("a", "b")),
    (["--allow-model", "c"], {"RELAY_MODELS": "a,b"}, ("c",)),
    ([], {}, ()),
], ids=["flags", "env", "flags-over-env", "none"])
def test_allow_model_flag_and_environment_build_the_allowlist(argv: list[str], environ: dict[str, str],
                                                               models: tuple[str, ...]) -> None:
    from relay.run.cli import config_from_args
    from relay.run.flags import build_parser

    args = build_parser().parse_args(["serve", *argv])
    assert config_from_args(args, environ).models == models


def test_default_model_outside_the_allowlist_is_a_config_error() -> None:
    from relay.config import Config, ConfigError

    with pytest.raises(ConfigError, match="--model 'x' is not one of the allowed models"):
        Config(model="x", models=("a",))


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/v1/responses/unknown/thing", 404),
    ("GET", "/v1/embeddings", 404),
    ("GET", "/v1", 404),
    ("GET", "/v1/chat/completions", 405),
    ("DELETE", "/v1/models", 405),
    ("PUT", "/v1/upstreams", 405),
], ids=lambda v: str(v))
async def test_unknown_routes_and_wrong_methods_under_v1_answer_openai_error_json(
        relay: Any, method: str, path: str, status: int) -> None:
    resp = await relay.request(method, path)
    assert resp.status == status
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"] in (
        "unknown_url", "method_not_allowed")
    if status == 405:
        assert "GET" in resp.headers["Allow"] or "POST" in resp.headers["Allow"]
