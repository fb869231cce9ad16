"""Bad requests get a 4xx whose message names the problem, and the relay keeps serving."""

from __future__ import annotations

import io
from typing import Any

import pytest

from conftest import FakeUpstream, SSEClient, text_of

Client = Any


@pytest.mark.parametrize(("body", "status", "words"), [
    pytest.param(b"{not json", 400, "not valid JSON", id="invalid-json"),
    pytest.param(b"", 400, "body is empty", id="empty-body"),
    pytest.param(b"\xff\xfe{}", 400, "not valid UTF-8", id="invalid-utf8"),
    pytest.param(b"[1, 2]", 400, "must be a JSON object", id="array-body"),
    pytest.param(b'{"messages": []}', 400, "'messages' must not be empty", id="empty-messages"),
    pytest.param(b'{"messages": "hi"}', 400, "'messages' must be a list", id="messages-not-list"),
    pytest.param(b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "'messages[0].role'", id="bad-role"),
    pytest.param(b'{"messages": [{"role": "user", "content": 5}]}', 400, "'messages[0].content'",
                 id="content-wrong-type"),
    pytest.param(b'{"messages": [{"role": "user"}]}', 400, "'messages[0].content' is required",
                 id="content-missing"),
    pytest.param(b'{"prompt": "x", "frobnicate": true}', 400, "'frobnicate' is not a supported field",
                 id="unknown-field"),
    pytest.param(b'{"prompt": "x", "messages": []}', 400, "exactly one of", id="prompt-and-messages"),
    pytest.param(b'{"prompt": ""}', 400, "'prompt' must be a non-empty string", id="empty-prompt"),
    pytest.param(b'{"prompt": "x", "temperature": "hot"}', 400, "'temperature'", id="temperature-type"),
    pytest.param(b'{"prompt": "x", "temperature": 9}', 400, "'temperature'", id="temperature-range"),
    pytest.param(b'{"prompt": "x", "max_tokens": -1}', 400, "'max_tokens' must be a positive", id="max-tokens"),
    pytest.param(b'{"prompt": "x", "max_tokens": true}', 400, "'max_tokens'", id="max-tokens-bool"),
    pytest.param(b'{"prompt": "x", "stop": [1]}', 400, "'stop'", id="stop-type"),
    pytest.param(b'{"prompt": "x", "model": ""}', 400, "'model'", id="empty-model"),
    pytest.param(b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413, "larger than the limit",
                 id="oversized-body"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply", id="deeply-nested"),
])
async def test_bad_body_gets_4xx_naming_the_problem(relay: Client, upstream: FakeUpstream, body: bytes,
                                                    status: int, words: str) -> None:
    resp = await relay.post("/chat", data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert words in error["message"]
    assert upstream.calls == 0
    ok = await relay.post("/chat", json={"prompt": "still serving?"})
    assert text_of(await SSEClient(ok).all()) == "Hello, world!"


async def test_unknown_query_parameter_on_get_chat_is_named(relay: Client, upstream: FakeUpstream) -> None:
    resp = await relay.get("/chat", params={"prompt": "x", "evil": "1"})
    assert resp.status == 400
    assert "'evil'" in (await resp.json())["error"]["message"]
    assert upstream.calls == 0


async def test_model_required_when_relay_has_no_default(make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(model=None)
    resp = await relay.post("/chat", json={"prompt": "x"})
    assert resp.status == 400 and "'model' is required" in (await resp.json())["error"]["message"]
