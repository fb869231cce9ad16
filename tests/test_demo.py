"""The demo model speaks OpenAI's chat-completions protocol over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from relay.demo import DEMO_MODEL, compose_reply, make_demo_app, start_demo_upstream

PROMPT = "Hello there, demo model"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner, url = await start_demo_upstream(port=0, token_delay=0)
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as c:
        yield c


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """Raw `data:` payloads in order, asserting the OpenAI framing (one data line + blank line)."""
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[len("data: "):] for e in events]


async def post_stream(session: aiohttp.ClientSession, base_url: str, **body: Any) -> list[str]:
    payload = {"model": DEMO_MODEL, "messages": USER, "stream": True, **body}
    async with session.post(f"{base_url}/chat/completions", json=payload) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        return await sse_events(resp)


async def test_base_url_is_loopback_v1_with_real_port(base_url: str) -> None:
    assert base_url.startswith("http://127.0.0.1:")
    assert base_url.endswith("/v1")
    assert int(base_url.split(":")[2].split("/")[0]) > 0


async def test_sdk_streamed_text_equals_non_streamed_text(client: AsyncOpenAI) -> None:
    full = await client.chat.completions.create(model=DEMO_MODEL, messages=USER)
    stream = await client.chat.completions.create(model=DEMO_MODEL, messages=USER, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(pieces) > 10, "tokens should arrive one chunk at a time"
    assert "".join(pieces) == full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.object == "chat.completion"
    tokens = [p for p in pieces if p]  # the role chunk and finish chunk carry no text
    assert full.usage is not None and full.usage.completion_tokens == len(tokens)


async def test_stream_chunks_have_openai_shape_and_end_with_done(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    events = await post_stream(session, base_url)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert list(c) == ["id", "object", "created", "model", "choices"]  # OpenAI's key order
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == DEMO_MODEL
        assert isinstance(c["created"], int)
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1])
    assert text == compose_reply(PROMPT)


async def test_include_usage_adds_final_usage_chunk_with_empty_choices(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    events = await post_stream(session, base_url, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    token_chunks = len(events) - 4  # role chunk, finish chunk, usage chunk, [DONE]
    assert usage["completion_tokens"] == token_chunks
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_no_usage_chunk_without_include_usage(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    events = await post_stream(session, base_url, stream_options={"include_usage": False})
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


async def test_sdk_include_usage_reports_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=DEMO_MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    usages = [c.usage async for c in stream if c.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens > 0


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
async def test_token_cap_truncates_with_finish_reason_length(
    session: aiohttp.ClientSession, base_url: str, param: str
) -> None:
    events = await post_stream(session, base_url, **{param: 3}, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert len(chunks) == 1 + 3 + 1 + 1  # role, 3 tokens, finish, usage
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_sdk_non_streamed_max_tokens_gives_length(client: AsyncOpenAI) -> None:
    full = await client.chat.completions.create(model=DEMO_MODEL, messages=USER, max_tokens=2)
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 2
    assert full.choices[0].message.content == "You said:"


async def test_response_model_echoes_requested_model_or_defaults(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    url = f"{base_url}/chat/completions"
    async with session.post(url, json={"model": "gpt-whatever", "messages": USER}) as resp:
        assert (await resp.json())["model"] == "gpt-whatever"
    async with session.post(url, json={"messages": USER}) as resp:
        assert (await resp.json())["model"] == DEMO_MODEL


async def test_invalid_json_gives_400_with_openai_error_shape(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    async with session.post(
        f"{base_url}/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] is None and body["error"]["message"]


@pytest.mark.parametrize(
    "payload",
    [{}, {"messages": []}, {"messages": "hi"}, {"messages": ["hi"]}, [1, 2]],
    ids=["missing", "empty", "string", "non-object-item", "body-not-object"],
)
async def test_missing_or_empty_messages_gives_400(
    session: aiohttp.ClientSession, base_url: str, payload: Any
) -> None:
    async with session.post(f"{base_url}/chat/completions", json=payload) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    if isinstance(payload, dict):
        assert error["param"] == "messages"


async def test_sdk_surfaces_bad_request_as_error(client: AsyncOpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=DEMO_MODEL, messages=[])
    assert "messages" in str(info.value)


async def test_models_endpoint_lists_relay_demo(
    session: aiohttp.ClientSession, base_url: str, client: AsyncOpenAI
) -> None:
    async with session.get(f"{base_url}/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert body["data"] == [
        {"id": "relay-demo", "object": "model", "created": body["data"][0]["created"], "owned_by": "relay"}
    ]
    assert [m.id async for m in client.models.list()] == [DEMO_MODEL]


async def test_reply_quotes_last_user_message_including_text_parts(client: AsyncOpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question?"}]},
    ]
    full = await client.chat.completions.create(model=DEMO_MODEL, messages=messages)
    content = full.choices[0].message.content or ""
    assert content.startswith("You said: “second question?”.")
    assert "2 words" in content and "question" in content and "first" not in content


def test_reply_is_deterministic_and_shows_code_fence_when_code_mentioned() -> None:
    reply = compose_reply("show me some code please")
    assert reply == compose_reply("show me some code please")
    assert "```python\n" in reply and reply.count("```") == 2
    assert "```" not in compose_reply("hello")
    assert "```" not in compose_reply("please decode this")
    assert "--upstream" in reply and "OPENAI_BASE_URL" in reply


def test_long_prompt_is_truncated_in_the_quote() -> None:
    reply = compose_reply("word " * 500)
    quote = reply.split("“")[1].split("”")[0]
    assert len(quote) <= 201 and quote.endswith("…")
    assert "500 words" in reply


async def test_client_disconnect_cancels_generation(session: aiohttp.ClientSession) -> None:
    # A middleware observes how the demo handler ends; the stream would take ~10 s if not stopped.
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @web.middleware
    async def watch(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            outcome.set_result("cancelled")
            raise
        outcome.set_result("returned")
        return resp

    app = make_demo_app(token_delay=0.2)
    app.middlewares.append(watch)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        payload = {"messages": USER, "stream": True}
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=payload) as resp:
            first = await resp.content.readuntil(b"\n\n")
            assert b'"role":"assistant"' in first
            assert not outcome.done()
            resp.close()  # drop the connection mid-stream
        assert await asyncio.wait_for(outcome, timeout=2) == "cancelled"
    finally:
        await runner.cleanup()
