"""Upstream failures become one clear ``error`` event with the right code; the relay keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from aiohttp import web

from conftest import TEST_KEY, Behaviour, FakeUpstream, SSEClient, chunk, sse, text_of, tokens

Client = Any


def status(code: int, body: Any, *, content_type: str = "application/json",
           headers: dict[str, str] | None = None) -> Behaviour:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=code, text=text, content_type=content_type, headers=headers)
    return run


def openai_error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def raw(*pieces: bytes, then: str = "eof") -> Behaviour:
    """Send raw bytes, then end cleanly ("eof") or reset the connection ("reset")."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        for piece in pieces:
            await fake.send(resp, piece)
        if then == "reset":
            assert request.transport is not None
            request.transport.abort()
            await fake.release.wait()
        return resp
    return run


async def never_answers(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
    await fake.release.wait()
    raise AssertionError("unreachable: the test never releases")


async def run_chat(relay: Client) -> list[dict[str, Any]]:
    resp = await relay.post("/chat", json={"prompt": "hi"})
    assert resp.status == 200
    return await SSEClient(resp).all()


CASES = [
    pytest.param(status(401, openai_error(f"Incorrect API key provided: {TEST_KEY[:12]}****", "invalid_request_error",
                                          "invalid_api_key")),
                 "upstream_error", 401, "rejected the relay's credentials", False, id="401-credentials"),
    pytest.param(status(403, openai_error("Project does not have access", "insufficient_quota")),
                 "upstream_error", 403, "rejected the relay's credentials", False, id="403-credentials"),
    pytest.param(status(404, openai_error("The model `nope` does not exist", "invalid_request_error",
                                          "model_not_found")),
                 "upstream_error", 404, "The model `nope` does not exist", False, id="404-model"),
    pytest.param(status(429, openai_error("Rate limit reached", "requests"), headers={"retry-after": "7"}),
                 "upstream_error", 429, "Rate limit reached", True, id="429-retry-after"),
    pytest.param(status(500, openai_error("The server had an error", "server_error")),
                 "upstream_error", 500, "The server had an error", True, id="500-json"),
    pytest.param(status(502, "<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"),
                 "upstream_error", 502, "HTTP 502", True, id="502-html-page"),
    pytest.param(raw(sse(chunk("", role="assistant")), sse(chunk("partial")), then="reset"),
                 "upstream_ended", None, "broke before the answer was finished", True, id="reset-mid-stream"),
    pytest.param(raw(sse(chunk("partial")), b"data: {not json at all\n\n"),
                 "upstream_error", None, "not JSON", True, id="garbage-line"),
    pytest.param(raw(sse(chunk("partial")), b"data: " + b"x" * (1024 * 1024) + b"\n\n"),
                 "upstream_error", None, "oversized event", False, id="one-mib-event"),
    pytest.param(raw(sse(chunk("", role="assistant")), sse(chunk("partial"))),
                 "upstream_ended", None, "before the answer was finished", True, id="eof-before-finish"),
    pytest.param(raw(sse(chunk("partial")), sse(openai_error("overloaded", "server_error"))),
                 "upstream_error", None, "overloaded", True, id="error-object-mid-stream"),
]


@pytest.mark.parametrize(("behaviour", "code", "status_code", "message", "retriable"), CASES)
async def test_upstream_failure_becomes_one_clear_error_event(make_relay: Any, upstream: FakeUpstream,
                                                              behaviour: Behaviour, code: str,
                                                              status_code: int | None, message: str,
                                                              retriable: bool) -> None:
    relay = await make_relay()
    upstream.behaviour = behaviour
    events = await run_chat(relay)
    assert events[0]["type"] == "start"
    terminal = [e for e in events if e["type"] in ("done", "error")]
    assert len(terminal) == 1 and terminal[0] is events[-1]
    error = events[-1]
    assert error["type"] == "error", error
    assert error["code"] == code
    assert error.get("status") == status_code
    assert message in error["message"]
    assert error["retriable"] is retriable
    assert TEST_KEY[:12] not in json.dumps(events)
    if status_code == 429:
        assert error["retry_after"] == "7"
    # The relay keeps serving.
    upstream.behaviour = tokens(["still", " fine"])
    assert text_of(await run_chat(relay)) == "still fine"


async def test_connection_refused_is_an_upstream_error(make_relay: Any) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = await make_relay(upstream=f"http://127.0.0.1:{port}/v1")
    events = await run_chat(relay)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_error"
    assert "could not connect" in events[-1]["message"] and events[-1]["retriable"] is True


async def test_no_headers_before_first_token_timeout_is_upstream_timeout(make_relay: Any,
                                                                         upstream: FakeUpstream) -> None:
    upstream.behaviour = never_answers
    relay = await make_relay(first_token_timeout=0.2)
    events = await run_chat(relay)
    assert events[-1]["code"] == "upstream_timeout" and "first-token timeout" in events[-1]["message"]
    await asyncio.wait_for(upstream.closed.wait(), 10)  # and the request was abandoned, not left open


async def test_silence_after_first_chunk_is_idle_timeout(make_relay: Any, upstream: FakeUpstream) -> None:
    async def stalls(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("first")))
        await fake.release.wait()
        return resp
    upstream.behaviour = stalls
    relay = await make_relay(idle_timeout=0.2)
    events = await run_chat(relay)
    assert text_of(events) == "first"
    assert events[-1]["code"] == "upstream_timeout" and "idle timeout" in events[-1]["message"]


async def test_eof_after_finish_reason_without_done_counts_as_finished(relay: Client,
                                                                        upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["a", "b"], done=False, usage=False, finish="length")
    events = await run_chat(relay)
    assert events[-1] == {"type": "done", "finish_reason": "length", "usage": None}


async def test_non_stream_content_type_is_an_error(relay: Client, upstream: FakeUpstream) -> None:
    upstream.behaviour = status(200, {"choices": []})
    events = await run_chat(relay)
    assert events[-1]["code"] == "upstream_error" and "not an event stream" in events[-1]["message"]


async def test_connection_refused_message_does_not_name_the_upstream_address(make_relay: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = await make_relay(upstream=f"http://127.0.0.1:{port}/v1")
    events = await run_chat(relay)
    assert events[-1]["message"] == "could not connect to the upstream (Connection refused)"
    assert str(port) not in json.dumps(events)


@pytest.mark.parametrize("where", ["before-stream", "mid-stream"])
async def test_relay_key_quoted_by_an_upstream_error_is_blanked_on_chat(relay: Client, upstream: FakeUpstream,
                                                                        where: str) -> None:
    quoted = openai_error(f"quota exceeded for key {TEST_KEY}", "server_error")
    upstream.behaviour = (status(500, quoted) if where == "before-stream"
                          else raw(sse(chunk("partial")), sse(quoted)))
    events = await run_chat(relay)
    assert events[-1]["code"] == "upstream_error"
    assert "quota exceeded for key [redacted]" in events[-1]["message"]
    assert TEST_KEY not in json.dumps(events)
