"""``POST /v1/responses`` through the relay, read by the official ``openai`` SDK: typed events passed
on byte for byte, real status codes, one honest ending, the upstream closed when the client leaves,
the relay's limits, and the demo model speaking the Responses API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, chunked, raw_upstream

RESP = "resp_0123456789abcdef"


def event(kind: str, seq: int, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n".encode()


def response_obj(status: str, output: list[Any], usage: Any = None) -> dict[str, Any]:
    return {"id": RESP, "object": "response", "created_at": 1760000000, "status": status, "error": None,
            "incomplete_details": None, "model": "fake-model", "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "usage": usage}


USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 21,
         "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 30}
MESSAGE = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]}
CALL = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city":"Paris"}'}
REASONING = {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Think."}]}

#: A whole answer: reasoning summary, text in pieces, a function call whose arguments are split.
EVENTS = [
    event("response.created", 0, response=response_obj("in_progress", [])),
    event("response.in_progress", 1, response=response_obj("in_progress", [])),
    event("response.output_item.added", 2, output_index=0, item={"id": "rs_1", "type": "reasoning", "summary": []}),
    event("response.reasoning_summary_part.added", 3, item_id="rs_1", output_index=0, summary_index=0,
          part={"type": "summary_text", "text": ""}),
    event("response.reasoning_summary_text.delta", 4, item_id="rs_1", output_index=0, summary_index=0,
          delta="Think."),
    event("response.reasoning_summary_text.done", 5, item_id="rs_1", output_index=0, summary_index=0,
          text="Think."),
    event("response.reasoning_summary_part.done", 6, item_id="rs_1", output_index=0, summary_index=0,
          part={"type": "summary_text", "text": "Think."}),
    event("response.output_item.done", 7, output_index=0, item=REASONING),
    event("response.output_item.added", 8, output_index=1,
          item={"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
    event("response.content_part.added", 9, item_id="msg_1", output_index=1, content_index=0,
          part={"type": "output_text", "text": "", "annotations": []}),
    event("response.output_text.delta", 10, item_id="msg_1", output_index=1, content_index=0, delta="Hel"),
    event("response.output_text.delta", 11, item_id="msg_1", output_index=1, content_index=0, delta="lo there"),
    event("response.output_text.done", 12, item_id="msg_1", output_index=1, content_index=0, text="Hello there"),
    event("response.content_part.done", 13, item_id="msg_1", output_index=1, content_index=0,
          part={"type": "output_text", "text": "Hello there", "annotations": []}),
    event("response.output_item.done", 14, output_index=1, item=MESSAGE),
    event("response.output_item.added", 15, output_index=2, item={**CALL, "status": "in_progress", "arguments": ""}),
    event("response.function_call_arguments.delta", 16, item_id="fc_1", output_index=2, delta='{"city":'),
    event("response.function_call_arguments.delta", 17, item_id="fc_1", output_index=2, delta='"Paris"}'),
    event("response.function_call_arguments.done", 18, item_id="fc_1", output_index=2, arguments='{"city":"Paris"}'),
    event("response.output_item.done", 19, output_index=2, item=CALL),
    event("response.completed", 20, response=response_obj("completed", [REASONING, MESSAGE, CALL], USAGE)),
]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nx-request-id: req_resp_1\r\n"


def stream_script(events: list[bytes], *, end: bytes = b"0\r\n\r\n") -> bytes:
    return SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*events) + end


@asynccontextmanager
async def responses_server(handler: Any) -> AsyncIterator[str]:
    """A real upstream on loopback whose ``POST /v1/responses`` is ``handler``; its base URL.
    Handler cancellation is on, as in aiohttp's own server: a closed connection cancels it."""
    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def sdk_for(relay: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="client-side-key", max_retries=0)


async def test_a_streamed_response_passes_every_event_byte_for_byte(make_relay: Any) -> None:
    async with raw_upstream(stream_script(EVENTS)) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True})
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "req_resp_1"
        body = await resp.read()
    # Keepalive comments aside, the bytes are the upstream's events, in order, and nothing after them.
    assert b"".join(line + b"\n" for line in body.split(b"\n")[:-1] if not line.startswith(b":")) \
        .replace(b"\n\n\n", b"\n\n") == b"".join(EVENTS)


async def test_the_sdk_reads_text_reasoning_and_a_split_function_call(make_relay: Any) -> None:
    async with raw_upstream(stream_script(EVENTS)) as url:
        relay = await make_relay(upstream=url)
        async with sdk_for(relay) as sdk:
            kinds, text, summary, args = [], "", "", ""
            async for ev in await sdk.responses.create(model="fake-model", input="hi", stream=True):
                kinds.append(ev.type)
                if ev.type == "response.output_text.delta":
                    text += ev.delta
                elif ev.type == "response.reasoning_summary_text.delta":
                    summary += ev.delta
                elif ev.type == "response.function_call_arguments.delta":
                    args += ev.delta
                elif ev.type == "response.completed":
                    final = ev.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" and len(kinds) == len(EVENTS)
    assert (text, summary, json.loads(args)) == ("Hello there", "Think.", {"city": "Paris"})
    assert final.usage is not None and final.usage.output_tokens == 21
    assert final.output_text == "Hello there"


async def test_the_sdks_stream_helper_gets_the_final_response(make_relay: Any) -> None:
    async with raw_upstream(stream_script(EVENTS)) as url:
        relay = await make_relay(upstream=url)
        async with sdk_for(relay) as sdk:
            async with sdk.responses.stream(model="fake-model", input="hi") as stream:
                async for _ in stream:
                    pass
                final = await stream.get_final_response()
    assert final.output_text == "Hello there" and final.id == RESP


async def test_a_non_streamed_response_is_passed_through_as_sent(make_relay: Any) -> None:
    body = json.dumps(response_obj("completed", [MESSAGE], USAGE)).encode()
    script = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi"})
        assert resp.status == 200 and await resp.read() == body
        async with sdk_for(relay) as sdk:
            answer = await sdk.responses.create(model="fake-model", input="hi")
    assert answer.output_text == "Hello there"


async def test_an_upstream_that_dies_mid_answer_ends_with_the_error_event_the_sdk_reads(make_relay: Any) -> None:
    # The text has begun, then the connection breaks: never a made-up response.completed.
    script = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*EVENTS[:11])
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True})
        body = (await resp.read()).decode()
        assert "response.completed" not in body
        last = [line for line in body.split("\n") if line.startswith("data: ")][-1]
        error = json.loads(last[len("data: "):])
        assert error["type"] == "error" and error["code"] == "upstream_ended" and error["sequence_number"] == 11
        assert "event: error\n" in body
        async with sdk_for(relay) as sdk:
            text, seen = "", []
            async for ev in await sdk.responses.create(model="fake-model", input="hi", stream=True):
                seen.append(ev)
                if ev.type == "response.output_text.delta":
                    text += ev.delta
        # The SDK's typed error event (ResponseErrorEvent), last, and no completion before it.
        assert text == "Hel" and seen[-1].type == "error" and seen[-1].code == "upstream_ended"
        assert "broke" in seen[-1].message and seen[-1].sequence_number == 11
        assert not any(ev.type == "response.completed" for ev in seen)


async def test_an_upstream_error_event_is_passed_on_as_one_with_the_key_blanked(make_relay: Any) -> None:
    failing = event("error", 11, code="server_error", param=None,
                    message=f"The server had an error while processing your request (key {TEST_KEY[:14]}...)")
    async with raw_upstream(stream_script([*EVENTS[:11], failing])) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True})
        body = (await resp.read()).decode()
    error = json.loads([line for line in body.split("\n") if line.startswith("data: ")][-1][len("data: "):])
    assert error["type"] == "error" and error["code"] == "server_error"
    assert "The server had an error" in error["message"] and TEST_KEY[:14] not in body


async def test_an_upstream_status_error_is_the_sdks_exception_with_its_retry_after(
        make_relay: Any, upstream: FakeUpstream) -> None:
    body = json.dumps({"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                                 "code": "rate_limit_exceeded"}}).encode()
    script = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nretry-after: 7\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body)) + body
    async with raw_upstream(script) as url:
        relay = await make_relay(upstream=url)
        async with sdk_for(relay) as sdk:
            with pytest.raises(openai.RateLimitError) as exc:
                await sdk.responses.create(model="fake-model", input="hi", stream=True)
    assert exc.value.status_code == 429 and exc.value.response.headers["retry-after"] == "7"
    assert "Rate limit reached" in exc.value.message


@pytest.mark.parametrize("body,param", [
    ({"model": "fake-model", "input": "hi", "background": "yes"}, "background"),
    ({"model": "fake-model"}, "input"),
    ({"model": "fake-model", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "other-model", "input": "hi"}, "model"),
], ids=["background-not-a-bool", "no-input", "bad-max-output-tokens", "model-not-allowed"])
async def test_a_request_the_relay_refuses_is_a_400_naming_the_field(
        make_relay: Any, upstream: FakeUpstream, body: dict[str, Any], param: str) -> None:
    relay = await make_relay(models=("fake-model",))
    async with sdk_for(relay) as sdk:
        with pytest.raises(openai.BadRequestError) as exc:
            await sdk.responses.create(**body)
    assert exc.value.status_code == 400 and exc.value.param == param
    assert upstream.calls == 0


async def test_the_output_token_ceiling_is_max_output_tokens(make_relay: Any) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(response_obj("completed", [MESSAGE], USAGE))
    async with responses_server(handler) as url:
        relay = await make_relay(upstream=url, max_output_tokens=100)
        assert (await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi"})).status == 200
        assert (await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi",
                                                        "max_output_tokens": 50})).status == 200
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "max_output_tokens": 500})
        assert resp.status == 400 and "--max-output-tokens" in (await resp.json())["error"]["message"]
    assert [b["max_output_tokens"] for b in seen] == [100, 50]


async def test_a_client_that_leaves_closes_the_upstream_at_once(make_relay: Any) -> None:
    left = asyncio.Event()
    closed = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in EVENTS[:11]:
            await resp.write(piece)
        try:
            await left.wait()
            await asyncio.Event().wait()  # generating for ever, until the relay closes the connection
        except asyncio.CancelledError:
            closed.set()
            raise
        return resp
    async with responses_server(handler) as url:
        relay = await make_relay(upstream=url)
        resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True})
        while b"response.output_text.delta" not in await resp.content.readline():
            pass
        resp.close()
        left.set()
        async with asyncio.timeout(10):
            await closed.wait()


async def test_the_demo_model_speaks_the_responses_api(make_relay: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.generation")
    relay = await make_relay(upstream=None, model=None, demo_token_delay=0.0)
    async with sdk_for(relay) as sdk:
        text = ""
        async for ev in await sdk.responses.create(model="relay-demo", input="hello demo", stream=True):
            if ev.type == "response.output_text.delta":
                text += ev.delta
        answer = await sdk.responses.create(model="relay-demo", input="hello demo")
    assert "hello demo" in text and answer.output_text == text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("responses ")]
    assert len(lines) == 2 and all("outcome=done" in line for line in lines)
    assert all("tokens=2+" in line for line in lines)  # the Responses API's input/output token counts


@pytest.mark.parametrize("chunking", ["whole", "lines", "bytes", "random"])
async def test_the_sdk_reads_the_same_events_through_the_relay_as_directly_however_the_bytes_split(
        make_relay: Any, chunking: str) -> None:
    """A served stream in four chunkings (whole, line by line, byte by byte, seeded random cuts):
    the events the SDK parses through the relay equal those it parses from the upstream itself."""
    from test_wire_corpus import pieces

    body = b"".join(EVENTS)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in pieces(body, chunking, f"responses-{chunking}"):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def read(base_url: str) -> list[dict[str, Any]]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as sdk:
            return [ev.to_dict() async for ev in await sdk.responses.create(model="fake-model", input="hi",
                                                                              stream=True)]
    async with responses_server(handler) as upstream_url:
        direct = await read(upstream_url)
        relay = await make_relay(upstream=upstream_url)
        through = await read(str(relay.make_url("/v1")))
    assert len(direct) == len(EVENTS) and through == direct


def _recording(calls: list[str]) -> Any:
    """A Responses upstream that records each request's path and answers EVENTS (or one object)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if not (await request.json()).get("stream"):
            return web.json_response(response_obj("completed", [MESSAGE], USAGE))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(EVENTS))
        await resp.write_eof()
        return resp
    return handler


async def test_an_upstream_without_the_responses_api_is_never_sent_one(
        aiohttp_client: Any, upstream: FakeUpstream) -> None:
    from relay.config import Config
    from relay.http.app import make_app
    from relay.upstream.config import parse_upstreams

    calls: list[str] = []
    async with responses_server(_recording(calls)) as url:
        specs = parse_upstreams([
            # First in order, but configured as chat completions only.
            {"name": "chat-only", "url": upstream.base_url, "models": ["m"], "priority": 0, "responses": False},
            {"name": "full", "url": url, "models": ["m"], "priority": 1},
        ], {})
        relay = await aiohttp_client(make_app(Config(upstreams=specs, model="m", rate_limit=0)))
        async with sdk_for(relay) as sdk:
            answer = await sdk.responses.create(model="m", input="hi")
        assert answer.output_text == "Hello there" and calls == ["/v1/responses"] and upstream.calls == 0


async def test_a_404_on_the_route_is_learnt_and_a_model_served_only_there_is_a_clear_400(
        make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay()  # the fake upstream serves chat completions only: /v1/responses is its 404
    async with sdk_for(relay) as sdk:
        with pytest.raises(openai.BadRequestError) as first:
            await sdk.responses.create(model="fake-model", input="hi")
        assert "Responses API" in first.value.message
        with pytest.raises(openai.BadRequestError) as second:
            await sdk.responses.create(model="fake-model", input="hi", stream=True)
        assert second.value.param == "model" and "/v1/chat/completions" in second.value.message
        # Chat completions through the same upstream are unaffected.
        text = ""
        async for chunk in await sdk.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "Hello, world!" and upstream.calls == 1
    state = (await (await relay.get("/v1/upstreams")).json())["upstreams"][0]
    assert state["state"] == "ok"  # not cooling down: it is well, it just lacks the API
