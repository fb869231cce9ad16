"""Recorded Responses API streams (tests/wire/responses/), replayed by a real server in four
chunkings, read by the official ``openai`` SDK straight from the replay and through the relay.

What the SDK reads through ``/v1/responses`` must equal what it reads from the provider: every
event's ``to_dict()``, or the same exception.  And the bytes: apart from the relay's own comment
lines (the keepalives and its end mark), what the client receives is the provider's events,
re-framed byte for byte.  The recordings name their sources (tests/wire/gather.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from conftest import TEST_KEY
from relay.config import Config
from relay.http.app import make_app
from test_wire_corpus import CHUNKINGS, pieces

WIRE = Path(__file__).parent / "wire" / "responses"
RECORDINGS = {str(p.relative_to(WIRE).with_suffix("")): p for p in sorted(WIRE.glob("*/*/*.json"))}


def load(name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(RECORDINGS[name].read_text(encoding="utf-8"))
    return record


def test_the_responses_corpus_names_its_sources() -> None:
    assert len(RECORDINGS) >= 15
    assert {load(n)["provider"] for n in RECORDINGS} >= {"openai", "deepseek", "openrouter"}
    for name in RECORDINGS:
        record = load(name)
        assert record["source"].startswith("https://github.com/") and record["fidelity"] in ("bytes", "payloads")


@dataclass
class Replay:
    record: dict[str, Any] = field(default_factory=dict)
    chunking: str = "whole"
    name: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/responses", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=self.record["status"], headers=self.record["headers"])
        await resp.prepare(request)
        for piece in pieces(self.record["body"].encode("utf-8"), self.chunking, self.name):
            await resp.write(piece)
        await resp.write_eof()
        return resp


async def read(base_url: str) -> tuple[list[dict[str, Any]], tuple[Any, ...] | None]:
    events: list[dict[str, Any]] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sdk-key", max_retries=0) as client:
        try:
            stream = await client.responses.create(model="m", input="hi", stream=True)
            async for event in stream:
                events.append(event.to_dict(warnings=False))
        except openai.APIStatusError as exc:
            return events, (type(exc), exc.status_code, exc.body)
        except openai.APIError as exc:
            return events, (type(exc), None, exc.body)
    return events, None


@pytest.fixture
async def replay(aiohttp_server: Any) -> AsyncIterator[tuple[Replay, str]]:
    fake = Replay()
    server = await aiohttp_server(fake.app())
    yield fake, str(server.make_url("/v1"))


@pytest.fixture
async def relay_for(replay: tuple[Replay, str], aiohttp_client: Any) -> Any:
    _, url = replay
    config = Config(upstream=url, api_key=TEST_KEY, rate_limit=0, max_streams_per_client=1_000_000)
    return await aiohttp_client(make_app(config))


@pytest.mark.parametrize("name", list(RECORDINGS))
@pytest.mark.parametrize("chunking", CHUNKINGS)
async def test_sdk_reads_through_the_relay_what_it_reads_from_the_provider(
        replay: tuple[Replay, str], relay_for: Any, name: str, chunking: str) -> None:
    fake, url = replay
    fake.record, fake.chunking, fake.name = load(name), chunking, name
    direct = await read(url)
    relayed = await read(str(relay_for.make_url("/v1")))
    assert relayed == direct


@pytest.mark.parametrize("name", list(RECORDINGS))
async def test_the_provider_s_events_are_relayed_byte_for_byte(
        replay: tuple[Replay, str], relay_for: Any, name: str) -> None:
    fake, _ = replay
    fake.record, fake.chunking, fake.name = load(name), "random", name
    resp = await relay_for.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    assert resp.status == 200
    body = await resp.read()
    # Comments are each side's own (keepalives): the relay sends its own, never the upstream's.
    events = [block for block in body.split(b"\n\n") if block and not block.startswith(b":")]
    want = [block for block in fake.record["body"].encode("utf-8").split(b"\n\n")
            if block and not block.startswith(b":")]
    if want[-1] == b"data: [DONE]":
        # OpenRouter closes a Responses stream as a chat completion, with [DONE] after the
        # terminal event; the relay ends the answer at the terminal event (docs/openai-endpoint.md).
        want.pop()
    assert events == want
