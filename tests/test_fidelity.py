"""Carrying providers' wire formats exactly: error objects verbatim, content parts, in-stream errors
that are not ``data:`` lines, and vendor parameters (each case failed before the fix)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, sse

Client = Any
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]

#: OpenRouter's 429 as recorded in pydantic-ai's cassette (tests/wire/openrouter/*errors_raised*).
OPENROUTER_429 = {"error": {"message": "Provider returned error", "code": 429, "metadata": {
    "raw": "google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream.", "provider_name": "Google"}},
    "user_id": "user_2wT5ElBE4Es3R4QrNLpZiXICmQP"}


@pytest.fixture
async def sdk(relay: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="client-side-key",
                                  max_retries=0) as client:
        yield client


def answer(status: int, body: bytes, content_type: str = "application/json",
           headers: dict[str, str] | None = None) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)
    return run


def stream(raw: bytes) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, raw)
        return resp
    return run


async def v1_stream(relay: Client, **extra: Any) -> Any:
    return await relay.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": MESSAGES, "stream": True, **extra})


# -- 1. upstream error objects pass through as sent -------------------------------------------

async def test_v1_error_body_keeps_every_field_of_the_upstreams(sdk: openai.AsyncOpenAI,
                                                                upstream: FakeUpstream) -> None:
    raw = json.dumps(OPENROUTER_429).encode()
    upstream.behaviour = answer(429, raw, headers={"retry-after": "7"})
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    assert info.value.status_code == 429
    assert info.value.body == OPENROUTER_429["error"]
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.response.content == raw  # the bytes as sent, not a re-encoding


async def test_v1_error_body_that_is_a_json_list_passes_through(relay: Client, upstream: FakeUpstream) -> None:
    # Gemini's OpenAI-compatible endpoint answers errors as a list holding one error object.
    raw = b'[{\n  "error": {\n    "code": 400,\n    "message": "bad",\n    "status": "INVALID_ARGUMENT"\n  }\n}\n]'
    upstream.behaviour = answer(400, raw)
    resp = await v1_stream(relay)
    assert resp.status == 400 and await resp.read() == raw


async def test_v1_error_body_is_blanked_only_where_it_quotes_the_key(relay: Client,
                                                                      upstream: FakeUpstream) -> None:
    body = {"error": {"message": f"bad key {TEST_KEY}", "type": "x", "failed_generation": "<tool>",
                      "status_code": 400}}
    upstream.behaviour = answer(400, json.dumps(body).encode())
    resp = await v1_stream(relay)
    text = await resp.text()
    assert resp.status == 400 and TEST_KEY not in text
    got = json.loads(text)["error"]
    assert got["failed_generation"] == "<tool>" and got["status_code"] == 400 and got["type"] == "x"
    assert got["message"] == "bad key [redacted]"


async def test_v1_error_body_quoting_the_key_in_json_escapes_is_blanked_too(relay: Client,
                                                                          upstream: FakeUpstream) -> None:
    escaped = "".join(f"\\u{ord(ch):04x}" for ch in TEST_KEY[:4]) + TEST_KEY[4:]
    upstream.behaviour = answer(400, ('{"error":{"message":"bad key ' + escaped + '","code":"x"}}').encode())
    resp = await v1_stream(relay)
    assert resp.status == 400
    got = await resp.json()
    assert TEST_KEY not in json.dumps(got) and got["error"] == {"message": "bad key [redacted]", "code": "x"}


@pytest.mark.parametrize("body,ctype", [
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    (json.dumps({"error": {"message": "x" * (70 * 1024)}}).encode(), "application/json"),
], ids=["html-page", "json-over-the-read-bound"])
async def test_v1_error_body_not_json_or_too_large_gets_the_relays_own(relay: Client, upstream: FakeUpstream,
                                                                        body: bytes, ctype: str) -> None:
    upstream.behaviour = answer(502, body, content_type=ctype)
    resp = await v1_stream(relay)
    got = await resp.json()
    assert resp.status == 502
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert "502" in got["error"]["message"] and "xxxx" not in got["error"]["message"]


async def test_v1_in_stream_error_object_passes_through_as_sent(relay: Client, upstream: FakeUpstream) -> None:
    error = ('{"error":{"message":"tool call validation failed","type":"invalid_request_error",'
             '"code":"tool_use_failed","failed_generation":"<function=x>"}}')
    upstream.behaviour = stream(sse(chunk("", role="assistant")) + sse(chunk("par")) + sse(error) + sse("[DONE]"))
    resp = await v1_stream(relay)
    got = await SSEClient(resp).all_data()
    assert got[-1] == error and "[DONE]" not in got


async def test_chat_error_event_carries_the_upstreams_type_code_and_detail(relay: Client,
                                                                           upstream: FakeUpstream) -> None:
    upstream.behaviour = answer(429, json.dumps(OPENROUTER_429).encode())
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    end = events[-1]
    assert end["type"] == "error" and end["code"] == "upstream_error" and end["status"] == 429
    assert end["upstream"]["code"] == 429
    assert end["upstream"]["detail"]["metadata"]["raw"] == OPENROUTER_429["error"]["metadata"]["raw"]
    assert "message" not in end["upstream"]["detail"]


async def test_chat_error_detail_is_bounded(relay: Client, upstream: FakeUpstream) -> None:
    # Within the 64 KiB read bound, so it is the upstream's; far over what an event should carry.
    body = {"error": {"message": "m", "type": "t", "code": "c", "huge": "y" * 30_000,
                      "more": [{"k": "z" * 5000} for _ in range(5)], "small": 1}}
    upstream.behaviour = answer(400, json.dumps(body).encode())
    resp = await relay.post("/chat", json={"prompt": "hi"})
    events = await SSEClient(resp).all()
    upstream_part = events[-1]["upstream"]
    assert upstream_part["type"] == "t" and upstream_part["code"] == "c"
    assert len(json.dumps(upstream_part)) <= 5000
    assert upstream_part["detail"]["huge"] == "y" * 1000 and upstream_part["detail"]["small"] == 1


# -- 2. content as a list of typed parts -----------------------------------------------------

def mistral(parts: list[Any], finish: str | None = None) -> bytes:
    return sse({"id": "m1", "object": "chat.completion.chunk", "created": 1, "model": "magistral",
                "choices": [{"index": 0, "delta": {"content": parts}, "finish_reason": finish}]})


async def test_chat_maps_thinking_parts_to_reasoning_and_text_parts_to_content(relay: Client,
                                                                               upstream: FakeUpstream) -> None:
    upstream.behaviour = stream(
        sse(chunk("", role="assistant"))
        + mistral([{"type": "thinking", "thinking": [{"type": "text", "text": "Okay"}]}])
        + mistral([{"type": "thinking", "thinking": [{"type": "text", "text": ", so"}]}])
        + mistral([{"type": "text", "text": "2 + 2"}, {"type": "text", "text": " = 4"}])
        + mistral([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
        + sse(chunk(finish_reason="stop")) + sse("[DONE]"))
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas[0] == {"type": "delta", "reasoning": "Okay"}
    assert "".join(e.get("reasoning", "") for e in deltas) == "Okay, so"
    assert "".join(e.get("content", "") for e in deltas) == "2 + 2 = 4"
    assert all(isinstance(e.get("content", ""), str) for e in deltas)
    assert deltas[-1] == {"type": "delta", "parts": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    assert events[-1]["type"] == "done"


# -- 3. in-stream errors that are not data: lines -------------------------------------------

LLAMA_CPP_ERROR = ('{"code":400,"message":"the request exceeds the available context size. try increasing the '
                   'context size or enable context shift","type":"invalid_request_error"}')
#: llama.cpp's server through 2025: an ``error:`` field line, then ``data: [DONE]``.
LLAMA_CPP_WIRE = f"error: {LLAMA_CPP_ERROR}\n\ndata: [DONE]\n\n".encode()


async def test_chat_sees_llama_cpp_error_field_as_an_error(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = stream(LLAMA_CPP_WIRE)
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    end = events[-1]
    assert end["type"] == "error" and "exceeds the available context size" in end["message"]
    assert end["upstream"]["type"] == "invalid_request_error"


async def test_v1_turns_llama_cpp_error_field_into_an_error_chunk_and_holds_done(relay: Client,
                                                                                upstream: FakeUpstream) -> None:
    upstream.behaviour = stream(LLAMA_CPP_WIRE)
    resp = await v1_stream(relay)
    assert resp.status == 200
    got = await SSEClient(resp).all_data()
    assert got == ['{"error":' + LLAMA_CPP_ERROR + "}"]


@pytest.mark.parametrize("data,message", [
    ('{"message":"overloaded","type":"server_error"}', "overloaded"),
    ("Too many requests, please slow down", "Too many requests, please slow down"),
], ids=["json-without-error-key", "plain-text"])
async def test_event_error_without_an_error_key_is_an_error(relay: Client, upstream: FakeUpstream,
                                                            data: str, message: str) -> None:
    upstream.behaviour = stream(sse(chunk("a", role="assistant")) + f"event: error\ndata: {data}\n\n".encode()
                                + sse("[DONE]"))
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1]["type"] == "error" and message in events[-1]["message"]
    got = await SSEClient(await v1_stream(relay)).all_data()
    assert "[DONE]" not in got and json.loads(got[-1])["error"]["message"] == message


async def test_done_without_finish_reason_stays_a_success(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = stream(sse(chunk("ok", role="assistant")) + sse("[DONE]"))
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1] == {"type": "done", "finish_reason": None, "usage": None}


# -- 4. vendor parameters --------------------------------------------------------------------

VENDOR = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "provider": {"order": ["groq"]},
          "transforms": ["middle-out"], "chat_template_kwargs": {"enable_thinking": False},
          "guided_json": {"type": "object"}}


async def test_v1_forwards_vendor_fields(relay: Client, upstream: FakeUpstream) -> None:
    resp = await v1_stream(relay, **VENDOR)
    assert resp.status == 200
    await resp.read()
    sent = upstream.requests[-1]
    assert {k: sent[k] for k in VENDOR} == VENDOR


@pytest.mark.parametrize("field,value,setting", [
    ("models", ["other-model"], {"models": ("fake-model",)}),
    ("route", "fallback", {"models": ("fake-model",)}),
    ("best_of", 8, {}),
    ("use_beam_search", True, {}),
    ("max_new_tokens", 100_000, {"max_output_tokens": 100}),
    ("n_predict", 100_000, {"max_output_tokens": 100}),
    ("thinking", {"type": "enabled", "budget_tokens": 100_000}, {"max_output_tokens": 100}),
])
async def test_v1_refuses_vendor_fields_that_walk_around_a_guard(make_relay: Any, upstream: FakeUpstream,
                                                                 field: str, value: Any,
                                                                 setting: dict[str, Any]) -> None:
    relay = await make_relay(**setting)
    resp = await v1_stream(relay, **{field: value})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == field
    assert field in body["error"]["message"]
    assert upstream.calls == 0


async def test_v1_guard_fields_pass_when_the_guard_is_off(make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay()  # no allowlist, no output ceiling
    resp = await v1_stream(relay, models=["a", "b"], max_new_tokens=50)
    assert resp.status == 200
    await resp.read()
    assert upstream.requests[-1]["models"] == ["a", "b"]


async def test_v1_strict_fields_and_refused_fields_are_settings(make_relay: Any, upstream: FakeUpstream) -> None:
    strict = await make_relay(strict_fields=True)
    resp = await v1_stream(strict, top_k=40)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "top_k"
    listed = await make_relay(refuse_fields=("provider",))
    resp = await v1_stream(listed, provider={"order": ["x"]})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "provider"
    resp = await v1_stream(listed, top_k=40)
    assert resp.status == 200
    await resp.read()


async def test_chat_accepts_the_common_generation_fields(relay: Client, upstream: FakeUpstream) -> None:
    fields = {"reasoning_effort": "low", "response_format": {"type": "json_object"},
              "parallel_tool_calls": False, "logprobs": True, "top_logprobs": 2,
              "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u1"}
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi", **fields})).all()
    assert events[-1]["type"] == "done"
    sent = upstream.requests[-1]
    assert {k: sent[k] for k in fields} == fields


@pytest.mark.parametrize("body,param,words", [
    ({"n": 2}, "n", "every choice is billed"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"top_k": 3}, "top_k", "not a supported field"),
])
async def test_chat_refuses_what_it_does_not_carry(relay: Client, upstream: FakeUpstream, body: dict[str, Any],
                                                   param: str, words: str) -> None:
    resp = await relay.post("/chat", json={"prompt": "hi", **body})
    got = await resp.json()
    assert resp.status == 400 and got["error"]["param"] == param and words in got["error"]["message"]
    assert upstream.calls == 0


def test_field_settings_come_from_flags_environment_and_file(tmp_path: Any) -> None:
    from relay.config import ConfigError
    from relay.run.cli import config_from_args
    from relay.run.flags import build_parser

    def config(*argv: str, environ: dict[str, str] | None = None) -> Any:
        return config_from_args(build_parser().parse_args(["serve", *argv]), environ or {})

    assert config().strict_fields is False and config().refuse_fields == ()
    assert config("--strict-fields").strict_fields is True
    assert config("--refuse-field", "provider", "--refuse-field", "top_k").refuse_fields == ("provider", "top_k")
    assert config(environ={"RELAY_REFUSE_FIELDS": "a, b"}).refuse_fields == ("a", "b")
    path = tmp_path / "relay.toml"
    path.write_text('strict-fields = true\nrefuse-fields = ["transforms"]\n')
    loaded = config("--config", str(path))
    assert loaded.strict_fields is True and loaded.refuse_fields == ("transforms",)
    for bad in ("messages", "two words", ""):
        with pytest.raises(ConfigError, match="--refuse-field"):
            config("--refuse-field", bad)
