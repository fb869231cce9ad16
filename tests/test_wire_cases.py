"""What real OpenAI-compatible servers put on the wire, through both /chat and /v1/chat/completions.

Each case is the raw body a real server sends (comments, CRLF, odd first chunks, error
objects, missing ``[DONE]``), written whole or in odd pieces that split UTF-8 characters,
CRLF pairs and JSON objects anywhere.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient
from relay.sse import SSEDecoder

Client = Any


def c(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    obj = {"id": "chatcmpl-w", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}], **extra}
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


ROLE = c({"role": "assistant", "content": ""})
DONE = "data: [DONE]\n\n"
TOOL_CALL = {"id": "call_1", "index": 0, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@dataclass
class Case:
    body: str
    content: str = ""
    reasoning: str = ""
    tool_calls: list[Any] = field(default_factory=list)
    #: ("done", finish_reason) or ("error", code).
    end: tuple[str, str] = ("done", "stop")


CASES = {
    "vllm-keepalive-comments-and-reasoning": Case(
        ROLE + ": keep-alive\n\n" + c({"reasoning": "let me think"}) + ": keep-alive\n\n"
        + c({"content": "Hi"}) + c(finish="stop") + DONE, content="Hi", reasoning="let me think"),
    "deepseek-reasoning-content": Case(
        ROLE + c({"reasoning_content": "hmm…"}) + c({"content": "Olá ✓"}) + c(finish="stop") + DONE,
        content="Olá ✓", reasoning="hmm…"),
    "openrouter-processing-comments": Case(
        ": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\n" + ROLE + c({"content": "ok"})
        + c(finish="stop") + DONE, content="ok"),
    "crlf-line-endings": Case(
        (ROLE + c({"content": "a€b"}) + c({"content": "😀"}) + c(finish="length") + DONE).replace("\n", "\r\n"),
        content="a€b😀", end=("done", "length")),
    "azure-empty-first-choices": Case(
        "data: " + json.dumps({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
        + "\n\n" + ROLE + c({"content": "filtered fine"}) + c(finish="stop") + DONE, content="filtered fine"),
    "ollama-whole-tool-call-in-one-chunk": Case(
        c({"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}) + c(finish="tool_calls") + DONE,
        tool_calls=[TOOL_CALL], end=("done", "tool_calls")),
    "error-object-then-done": Case(
        ROLE + c({"content": "par"}) + 'data: {"error": {"message": "overloaded", "type": "server_error", '
        '"param": null, "code": "overloaded"}}\n\n' + DONE, content="par", end=("error", "upstream_error")),
    "eof-without-done-after-finish": Case(
        ROLE + c({"content": "complete"}) + c(finish="stop"), content="complete"),
    "eof-before-finish": Case(
        ROLE + c({"content": "cut"}), content="cut", end=("error", "upstream_ended")),
}

#: Piece sizes that land splits inside multi-byte characters, CRLF pairs and JSON.
ODD_PIECES = (1, 3, 2, 7, 5, 11)


def serve(raw: bytes, pieces: tuple[int, ...] | None) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        if pieces is None:
            await fake.send(resp, raw)
            return resp
        pos = 0
        for size in cycle(pieces):
            if pos >= len(raw):
                break
            await fake.send(resp, raw[pos:pos + size])
            pos += size
            await asyncio.sleep(0)  # the upstream's pace: let each piece go out on its own
        return resp
    return run


def upstream_data(raw: bytes) -> list[str]:
    return [e.data for e in SSEDecoder().feed(raw)]


PIECES = pytest.mark.parametrize("pieces", [None, ODD_PIECES], ids=["whole", "odd-pieces"])
CASE = pytest.mark.parametrize("name", list(CASES))


@CASE
@PIECES
async def test_chat_route_relays_real_server_wire(relay: Client, upstream: FakeUpstream, name: str,
                                                  pieces: tuple[int, ...] | None) -> None:
    case = CASES[name]
    upstream.behaviour = serve(case.body.encode(), pieces)
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    deltas = [e for e in events if e["type"] == "delta"]
    assert "".join(e.get("content", "") for e in deltas) == case.content
    assert "".join(e.get("reasoning", "") for e in deltas) == case.reasoning
    assert [tc for e in deltas for tc in e.get("tool_calls", [])] == case.tool_calls
    end = events[-1]
    assert [e["type"] for e in events].count(end["type"]) == 1 and end["type"] in ("done", "error")
    kind, detail = case.end
    assert (end["type"], end["finish_reason"] if kind == "done" else end["code"]) == case.end


@CASE
@PIECES
async def test_v1_route_passes_real_server_wire_through(relay: Client, upstream: FakeUpstream, name: str,
                                                        pieces: tuple[int, ...] | None) -> None:
    case = CASES[name]
    raw = case.body.encode()
    upstream.behaviour = serve(raw, pieces)
    resp = await relay.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.status == 200
    got = [e.data for e in SSEDecoder().feed(await resp.read())]
    sent = [d for d in upstream_data(raw) if d != "[DONE]"]
    kind, code = case.end
    if kind == "done":
        # Every chunk exactly as the upstream sent it, then [DONE] (also when the upstream omitted it).
        assert got == sent + ["[DONE]"]
    else:
        # Chunks up to the failure, then one error object and the end: no [DONE], no finish_reason.
        chunks = [d for d in sent if "error" not in json.loads(d)]
        assert got[:-1] == chunks and "[DONE]" not in got
        error = json.loads(got[-1])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == ("overloaded" if code == "upstream_error" else code)
        assert all(ch["finish_reason"] is None for d in got[:-1] for ch in json.loads(d)["choices"])
