"""Real providers' recorded answers (tests/wire/), replayed by a real server in four chunkings,
read by the official ``openai`` SDK straight from the replay and through the relay.

What the SDK reads through ``/v1`` must equal what it reads from the provider: every chunk's
``to_dict()``, or the same exception class, status, body and retry headers.  The differences
kept on purpose are listed in ``DIVERGES`` (and in docs/openai-endpoint.md, with the reasons).
``/chat`` is checked against what the SDK read: the text, the reasoning, the tool calls, the
end (finish reason and usage, or the error with the upstream's status, type and code).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import TEST_KEY, SSEClient
from relay.config import Config
from relay.http.app import make_app

WIRE = Path(__file__).parent / "wire"
RECORDINGS = {str(p.relative_to(WIRE).with_suffix("")): p
              for p in sorted(WIRE.glob("*/*/*.json"))}
CHUNKINGS = ("whole", "lines", "bytes", "random")
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]

#: Recordings where the relay differs from the provider on purpose, and how.
DIVERGES = {
    # llama.cpp's ``error:`` field: a spec parser (the SDK's) drops it and sees an empty, finished
    # answer; the relay reads it as the error it is and ends /v1 with ``data: {"error": ...}``.
    "reconstructed/llamacpp/error-field-mid-stream": "error-recognised",
    "reconstructed/llamacpp/error-field-after-text": "error-recognised",
    # A body that is not JSON (a proxy's HTML page): the relay's own OpenAI-shaped error object.
    "reconstructed/nginx/http-502-html": "relays-own-error",
}


def load(name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(RECORDINGS[name].read_text(encoding="utf-8"))
    return record


def test_the_corpus_is_wide_enough() -> None:
    providers = {load(name)["provider"] for name in RECORDINGS} - {"nginx"}
    assert len(RECORDINGS) >= 40 and len(providers) >= 12, (len(RECORDINGS), sorted(providers))
    for name in RECORDINGS:
        record = load(name)
        assert record["source"].startswith("https://") and record["fidelity"] in ("bytes", "payloads",
                                                                                  "reconstructed")
        assert (record["fidelity"] == "reconstructed") == name.startswith("reconstructed/")


def pieces(body: bytes, chunking: str, seed: str) -> list[bytes]:
    if chunking == "whole":
        return [body]
    if chunking == "lines":
        return body.splitlines(keepends=True)
    if chunking == "bytes":
        return [body[i:i + 1] for i in range(len(body))]
    rng = random.Random(seed)  # seeded per recording: a failure replays the same cuts
    out, pos = [], 0
    while pos < len(body):
        size = rng.randint(1, 97)
        out.append(body[pos:pos + size])
        pos += size
    return out


@dataclass
class Replay:
    """The provider: answers every request with the recording, in the chosen pieces."""

    record: dict[str, Any] = field(default_factory=dict)
    chunking: str = "whole"
    name: str = ""
    requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        record = self.record
        resp = web.StreamResponse(status=record["status"], headers=record["headers"])
        await resp.prepare(request)
        for piece in pieces(record["body"].encode("utf-8"), self.chunking, self.name):
            await resp.write(piece)
        await resp.write_eof()
        return resp


@dataclass
class Outcome:
    """What an SDK program sees: the chunks, then the exception (class, status, body, retry headers)."""

    chunks: list[dict[str, Any]]
    error: tuple[Any, ...] | None


async def read(base_url: str) -> Outcome:
    chunks: list[dict[str, Any]] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sdk-key", max_retries=0) as client:
        try:
            stream = await client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                chunks.append(chunk.to_dict(warnings=False))  # list content is not the typed str
        except openai.APIStatusError as exc:
            headers = exc.response.headers
            return Outcome(chunks, (type(exc), exc.status_code, exc.body, exc.message,
                                    headers.get("retry-after"), headers.get("retry-after-ms")))
        except openai.APIError as exc:
            return Outcome(chunks, (type(exc), None, exc.body, exc.message))
    return Outcome(chunks, None)


@pytest.fixture
async def replay(aiohttp_server: Any) -> AsyncIterator[tuple[Replay, str, Any]]:
    fake = Replay()
    server = await aiohttp_server(fake.app())
    yield fake, str(server.make_url("/v1")), server


@pytest.fixture
async def relay_for(replay: tuple[Replay, str, Any], aiohttp_client: Any) -> Any:
    _, url, _ = replay
    config = Config(upstream=url, api_key=TEST_KEY, rate_limit=0, max_streams_per_client=1_000_000)
    return await aiohttp_client(make_app(config))


CORPUS = pytest.mark.parametrize("name", list(RECORDINGS))
CUTS = pytest.mark.parametrize("chunking", CHUNKINGS)


@CORPUS
@CUTS
async def test_sdk_reads_through_v1_what_it_reads_from_the_provider(replay: tuple[Replay, str, Any],
                                                                     relay_for: Any, name: str,
                                                                     chunking: str) -> None:
    fake, url, _ = replay
    fake.record, fake.chunking, fake.name = load(name), chunking, name
    direct = await read(url)
    relayed = await read(str(relay_for.make_url("/v1")))
    kind = DIVERGES.get(name)
    if kind is None:
        assert relayed.chunks == direct.chunks
        assert relayed.error == direct.error
    elif kind == "error-recognised":
        assert direct.error is None  # the SDK alone never sees the failure
        assert relayed.chunks == direct.chunks
        assert relayed.error is not None and relayed.error[0] is openai.APIError
        assert relayed.error[2]["type"] in ("invalid_request_error", "server_error")
    else:
        assert direct.error is not None and relayed.error is not None
        assert relayed.error[:2] == direct.error[:2]  # the class and the status
        assert set(relayed.error[2]) == {"message", "type", "param", "code"}
        assert str(fake.record["status"]) in relayed.error[2]["message"]


def expected_chat(outcome: Outcome, kind: str | None) -> dict[str, Any]:
    """/chat's events as the SDK's reading of the provider says they must be."""
    content, reasoning, parts, tool_calls = [], [], [], []
    finish, usage = None, None
    for chunk in outcome.chunks:
        choices = chunk.get("choices") or []
        for choice in choices:
            finish = choice.get("finish_reason") or finish
        if chunk.get("usage"):
            usage = chunk["usage"]
        delta = choices[0].get("delta") or {} if choices else {}
        text = delta.get("content")
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(text, list):
            for part in text:
                if part.get("type") == "text":
                    content.append(part["text"])
                elif part.get("type") == "thinking":
                    if not isinstance(thought, str) or not thought:
                        reasoning.extend(p["text"] for p in part["thinking"] if p.get("type") == "text")
                else:
                    parts.append(part)
        elif isinstance(text, str):
            content.append(text)
        if isinstance(thought, str):
            reasoning.append(thought)
        tool_calls.extend(delta.get("tool_calls") or [])
    want: dict[str, Any] = {"content": "".join(content), "reasoning": "".join(reasoning), "parts": parts,
                            "tool_calls": tool_calls}
    if outcome.error is None and kind is None:
        want["end"] = {"type": "done", "finish_reason": finish, "usage": usage}
    else:
        want["end"] = {"type": "error"}
    return want


@CORPUS
@CUTS
async def test_chat_events_say_what_the_provider_sent(replay: tuple[Replay, str, Any], relay_for: Any,
                                                      name: str, chunking: str) -> None:
    fake, url, _ = replay
    record = load(name)
    fake.record, fake.chunking, fake.name = record, chunking, name
    direct = await read(url)
    kind = DIVERGES.get(name)
    want = expected_chat(direct, kind)
    events = await SSEClient(await relay_for.post("/chat", json={"prompt": "hi", "model": "m"})).all()
    assert events[0]["type"] == "start"
    deltas = [e for e in events[1:-1]]
    assert all(e["type"] == "delta" for e in deltas)
    assert "".join(e.get("content", "") for e in deltas) == want["content"]
    assert "".join(e.get("reasoning", "") for e in deltas) == want["reasoning"]
    assert [p for e in deltas for p in e.get("parts", [])] == want["parts"]
    assert [t for e in deltas for t in e.get("tool_calls", [])] == want["tool_calls"]
    end = events[-1]
    if want["end"]["type"] == "done":
        assert end == want["end"]
        return
    assert end["type"] == "error" and end["code"] == "upstream_error"
    if record["status"] >= 400:
        assert end["status"] == record["status"]
    if direct.error is not None and kind is None:
        body = direct.error[2]
        error = body if isinstance(body, dict) else {}
        if isinstance(body, list):
            error = body[0].get("error", {})
        upstream = end.get("upstream", {})
        for key in ("type", "code"):
            if isinstance(error.get(key), (str, int)):
                assert upstream[key] == error[key]
        if isinstance(error.get("message"), str):
            assert error["message"][:100] in end["message"]
