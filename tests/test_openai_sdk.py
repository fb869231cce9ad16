"""/v1/chat/completions through the official openai SDK (sync and async), against the fake upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, chunk, sse, tokens

Client = Any
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
#: What OpenAI's own 401 looks like: it quotes part of the key.
KEY_FRAGMENT = "sk-test-****cdef"


@pytest.fixture
async def sdk(relay: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="client-side-key",
                                  max_retries=0) as client:
        yield client


def json_error(status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                            "code": code}}, status=status, headers=headers)
    return run


async def collect_text(stream: Any) -> str:
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_async_sdk_streamed_text_equals_upstream_text(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["Hel", "lo", " wörld", " 😀", "\n\nbye"])
    stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    assert await collect_text(stream) == "Hello wörld 😀\n\nbye"


async def test_sync_sdk_streamed_text_equals_upstream_text(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["one", " two", " three"])
    base_url = str(relay.make_url("/v1"))

    def run() -> str:
        with openai.OpenAI(base_url=base_url, api_key="client-side-key", max_retries=0) as client:
            stream = client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(run) == "one two three"


def parallel_tool_calls() -> Any:
    def tc(index: int, **fields: Any) -> dict[str, Any]:
        return {"index": index, **fields}

    deltas = [
        [tc(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""})],
        [tc(0, function={"arguments": '{"city":'})],
        [tc(1, id="call_b", type="function", function={"name": "get_time", "arguments": ""})],
        [tc(0, function={"arguments": ' "Paris"}'})],
        [tc(1, function={"arguments": '{"tz": "CET"}'})],
    ]

    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk(role="assistant")))
        for calls in deltas:
            await fake.send(resp, sse(chunk(tool_calls=calls)))
        await fake.send(resp, sse(chunk(finish_reason="tool_calls")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


async def test_parallel_tool_call_deltas_reassemble_into_the_right_calls(sdk: openai.AsyncOpenAI,
                                                                        upstream: FakeUpstream) -> None:
    upstream.behaviour = parallel_tool_calls()
    async with sdk.chat.completions.stream(model="fake-model", messages=MESSAGES) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"tz": "CET"})]
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("asked", [True, False], ids=["usage-asked", "usage-not-asked"])
async def test_usage_chunk_arrives_only_when_the_client_asked(sdk: openai.AsyncOpenAI, upstream: FakeUpstream,
                                                              asked: bool) -> None:
    options: Any = {"include_usage": True} if asked else openai.NOT_GIVEN
    stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True,
                                               stream_options=options)
    chunks = [c async for c in stream]
    usage = [c.usage for c in chunks if c.usage is not None]
    if asked:
        assert [u.total_tokens for u in usage] == [7] and chunks[-1].choices == []
    else:
        assert usage == [] and all(c.choices for c in chunks)
    # Either way the relay asked upstream, for its own log line.
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("status", "error"), [(404, openai.NotFoundError), (429, openai.RateLimitError)],
                         ids=["404-not-found", "429-rate-limit"])
async def test_upstream_status_raises_the_matching_sdk_error_with_retry_after(
        sdk: openai.AsyncOpenAI, upstream: FakeUpstream, status: int, error: type[Exception]) -> None:
    upstream.behaviour = json_error(status, "upstream says no", code="nope",
                                    headers={"retry-after": "7", "retry-after-ms": "7000", "x-request-id": "req-42"})
    with pytest.raises(error) as info:
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    exc = info.value
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == status and exc.code == "nope" and "upstream says no" in exc.message
    assert exc.response.headers["retry-after"] == "7" and exc.response.headers["retry-after-ms"] == "7000"
    assert exc.request_id == "req-42"
    assert upstream.calls == 1  # retries off: the relay itself never retries either


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_is_a_502_without_the_upstreams_text(
        sdk: openai.AsyncOpenAI, upstream: FakeUpstream, status: int) -> None:
    upstream.behaviour = json_error(status, f"Incorrect API key provided: {KEY_FRAGMENT}.", code="invalid_api_key")
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    exc = info.value
    assert exc.status_code == 502
    assert "relay's credentials" in exc.message
    text = exc.response.text
    for secret in (KEY_FRAGMENT, "Incorrect API key", TEST_KEY, "client-side-key"):
        assert secret not in text and secret not in str(exc)


async def test_mid_stream_upstream_failure_raises_api_error_after_the_text_so_far(
        sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    async def dies(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("partial", role="assistant")))
        return resp  # EOF with no finish_reason
    upstream.behaviour = dies
    stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        async for c in stream:
            seen.append(c)
    assert not isinstance(info.value, openai.APIStatusError)  # in-stream, after a 200
    assert "before the answer was finished" in info.value.message
    assert [c.choices[0].delta.content for c in seen] == ["partial"]
    assert all(c.choices[0].finish_reason is None for c in seen)  # nothing synthesized


async def test_closing_the_sdk_stream_closes_the_upstream_before_its_next_chunk(
        sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens([f"t{i}" for i in range(10)], delay=1.0)
    stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            break
    sent_when_closed = upstream.chunks_sent
    await stream.close()
    await asyncio.wait_for(upstream.closed.wait(), 10)
    assert upstream.closed_after_chunks == sent_when_closed


async def test_non_streaming_request_returns_the_upstreams_json(sdk: openai.AsyncOpenAI,
                                                                upstream: FakeUpstream) -> None:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole answer"},
                           "finish_reason": "stop", "logprobs": None}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}

    async def complete(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response(answer, headers={"x-request-id": "req-nonstream"})
    upstream.behaviour = complete
    raw = await sdk.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)
    assert json.loads(raw.text) == answer
    assert raw.parse().choices[0].message.content == "whole answer"
    assert raw.headers["x-request-id"] == "req-nonstream"
    assert "stream" not in upstream.requests[0] and "stream_options" not in upstream.requests[0]


async def test_error_after_the_first_keepalive_commits_to_200_and_arrives_in_stream(
        make_relay: Any, upstream: FakeUpstream) -> None:
    async def slow_then_429(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        await fake.release.wait()
        return await json_error(429, "slow down", code="rate_limit_exceeded")(request, fake)
    upstream.behaviour = slow_then_429
    relay = await make_relay(keepalive=0.05)
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
        assert stream.response.status_code == 200
        assert not upstream.release.is_set()  # the headers came before the upstream answered
        upstream.release.set()
        with pytest.raises(openai.APIError) as info:
            await collect_text(stream)
    assert "slow down" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "rate_limit_exceeded"


async def test_vendor_parameter_from_extra_body_reaches_the_upstream(sdk: openai.AsyncOpenAI,
                                                                     upstream: FakeUpstream) -> None:
    stream = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True,
                                               extra_body={"top_k": 5})
    assert await collect_text(stream) == "Hello, world!"
    assert upstream.requests[-1]["top_k"] == 5


async def test_guard_walking_parameter_is_a_bad_request_naming_it(sdk: openai.AsyncOpenAI,
                                                                  upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, extra_body={"best_of": 5})
    assert info.value.param == "best_of" and "best_of" in info.value.message and "--max-n" in info.value.message
    assert upstream.calls == 0


async def test_models_list_names_the_default_model(sdk: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in sdk.models.list()] == ["fake-model"]
    assert (await sdk.models.retrieve("fake-model")).id == "fake-model"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("other-model")


async def test_disallowed_model_is_a_bad_request_and_models_lists_the_allowlist(
        make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(models=("fake-model", "fake-mini"))
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="x", max_retries=0) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["fake-model", "fake-mini"]
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model="gpt-expensive", messages=MESSAGES, stream=True)
        assert info.value.param == "model" and "gpt-expensive" in info.value.message
        stream = await sdk.chat.completions.create(model="fake-mini", messages=MESSAGES, stream=True)
        assert await collect_text(stream) == "Hello, world!"
    assert [r["model"] for r in upstream.requests] == ["fake-mini"]


async def test_a_route_the_relay_does_not_serve_is_the_sdks_not_found_error_with_a_message(
        sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        await sdk.embeddings.create(model="fake-model", input="hi")
    assert exc.value.status_code == 404
    assert "no route /v1/embeddings" in exc.value.message and exc.value.code == "unknown_url"
