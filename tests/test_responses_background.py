"""Background responses the relay keeps and resumes (``background: true``), read with the official
``openai`` SDK: created at once, retrieved in progress and finished, replayed from ``starting_after``
and followed live, running on when the client leaves, cancelled with the upstream closed at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from test_responses import EVENTS, sdk_for


class GatedUpstream:
    """Streams EVENTS, holding after the first ``hold`` until ``go`` is set; records a closed connection."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.go = asyncio.Event()
        self.held = asyncio.Event()
        self.closed = asyncio.Event()
        self.finished = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b"".join(EVENTS[:self.hold]))
            self.held.set()
            await self.go.wait()
            await resp.write(b"".join(EVENTS[self.hold:]))
            await resp.write_eof()
            self.finished.set()
        except (asyncio.CancelledError, ConnectionResetError):
            self.closed.set()
            raise
        return resp


@pytest.fixture
async def gated(aiohttp_server: Any) -> AsyncIterator[tuple[GatedUpstream, str]]:
    fake = GatedUpstream(hold=11)
    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/responses", fake.handler)
    server = await aiohttp_server(app)  # handler cancellation on, as in every aiohttp test server
    yield fake, str(server.make_url("/v1"))


async def test_a_background_response_is_answered_at_once_then_retrieved_and_replayed(
        make_relay: Any, gated: tuple[GatedUpstream, str]) -> None:
    fake, url = gated
    relay = await make_relay(upstream=url)
    async with sdk_for(relay) as sdk:
        created = await sdk.responses.create(model="fake-model", input="hi", background=True)
        assert created.id.startswith("resp_") and created.status == "queued" and created.background
        async with asyncio.timeout(10):
            await fake.held.wait()
        # The upstream was asked for an ordinary streamed answer: the relay keeps it itself.
        assert fake.bodies[0]["stream"] is True and "background" not in fake.bodies[0]
        running = await sdk.responses.retrieve(created.id)
        assert running.id == created.id and running.status == "in_progress"
        fake.go.set()
        events = [ev async for ev in await sdk.responses.retrieve(created.id, stream=True)]
        assert [ev.sequence_number for ev in events] == list(range(len(EVENTS)))
        assert events[-1].type == "response.completed" and events[-1].response.id == created.id
        text = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
        assert text == "Hello there"
        done = await sdk.responses.retrieve(created.id)
        assert done.status == "completed" and done.output_text == "Hello there" and done.id == created.id
        # From a position: only what came after it.
        rest = [ev async for ev in await sdk.responses.retrieve(created.id, stream=True, starting_after=15)]
        assert [ev.sequence_number for ev in rest] == list(range(16, len(EVENTS)))


async def test_a_background_stream_runs_on_when_its_client_leaves_and_resumes_where_it_left(
        make_relay: Any, gated: tuple[GatedUpstream, str]) -> None:
    fake, url = gated
    relay = await make_relay(upstream=url, resume_grace=0)
    resp = await relay.post("/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True,
                                                   "background": True})
    seen: list[dict[str, Any]] = []
    while len(seen) < 11:
        line = await resp.content.readline()
        if line.startswith(b"data: "):
            seen.append(json.loads(line[len(b"data: "):]))
    resp.close()  # the client leaves mid-answer
    response_id = seen[0]["response"]["id"]
    fake.go.set()
    async with asyncio.timeout(10):
        await fake.finished.wait()  # the upstream was not closed: the answer completed
    assert not fake.closed.is_set()
    async with sdk_for(relay) as sdk:
        rest = [ev async for ev in await sdk.responses.retrieve(response_id, stream=True,
                                                                 starting_after=seen[-1]["sequence_number"])]
    assert [ev.sequence_number for ev in rest] == list(range(11, len(EVENTS)))
    assert rest[-1].type == "response.completed"


async def test_cancel_closes_the_upstream_at_once_and_the_response_says_cancelled(
        make_relay: Any, gated: tuple[GatedUpstream, str]) -> None:
    fake, url = gated
    relay = await make_relay(upstream=url)
    async with sdk_for(relay) as sdk:
        created = await sdk.responses.create(model="fake-model", input="hi", background=True)
        async with asyncio.timeout(10):
            await fake.held.wait()
        cancelled = await sdk.responses.cancel(created.id)
        assert cancelled.status == "cancelled" and cancelled.id == created.id
        async with asyncio.timeout(10):
            await fake.closed.wait()
        again = await sdk.responses.retrieve(created.id)
        assert again.status == "cancelled"


async def test_an_unknown_or_foreground_response_id_is_the_sdks_not_found_error(make_relay: Any) -> None:
    relay = await make_relay()
    async with sdk_for(relay) as sdk:
        for rid in ("resp_nosuchresponse", "chatcmpl-123"):
            with pytest.raises(openai.NotFoundError) as exc:
                await sdk.responses.retrieve(rid)
            assert "is kept by this relay" in exc.value.message


async def test_a_response_the_upstream_stored_is_read_and_deleted_through_it_with_the_relays_key(
        make_relay: Any, aiohttp_server: Any) -> None:
    from conftest import TEST_KEY

    seen: list[tuple[str, str, str]] = []
    stored = {"id": "resp_upstream1", "object": "response", "status": "completed", "model": "fake-model",
              "output": [], "metadata": {"note": f"echo {TEST_KEY}"}}

    async def get(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, request.headers.get("Authorization", "")))
        if request.match_info["id"] != "resp_upstream1":
            return web.json_response({"error": {"message": "No response found", "type": "invalid_request_error",
                                                "code": "not_found"}}, status=404)
        if request.method == "DELETE":
            return web.json_response({"id": "resp_upstream1", "object": "response", "deleted": True})
        return web.json_response(stored)

    async def items(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, request.headers.get("Authorization", "")))
        return web.json_response({"object": "list", "data": [], "has_more": False, "first_id": None,
                                  "last_id": None})
    app = web.Application()
    app.router.add_get("/v1/responses/{id}", get)
    app.router.add_delete("/v1/responses/{id}", get)
    app.router.add_get("/v1/responses/{id}/input_items", items)
    server = await aiohttp_server(app)
    relay = await make_relay(upstream=str(server.make_url("/v1")))
    async with sdk_for(relay) as sdk:
        got = await sdk.responses.retrieve("resp_upstream1")
        assert got.id == "resp_upstream1" and got.status == "completed"
        assert TEST_KEY not in json.dumps(got.to_dict())
        listed = await sdk.responses.input_items.list("resp_upstream1", limit=5)
        assert listed.data == []
        await sdk.responses.delete("resp_upstream1")
        with pytest.raises(openai.NotFoundError) as exc:
            await sdk.responses.retrieve("resp_missing")
        assert exc.value.message.endswith("No response found")
    assert [(m, p.split("?")[0]) for m, p, _ in seen] == [
        ("GET", "/v1/responses/resp_upstream1"), ("GET", "/v1/responses/resp_upstream1/input_items"),
        ("DELETE", "/v1/responses/resp_upstream1"), ("GET", "/v1/responses/resp_missing")]
    assert "limit=5" in seen[1][1]
    assert all(auth == f"Bearer {TEST_KEY}" for _, _, auth in seen)  # the relay's key, never the client's


async def test_a_background_response_is_not_a_chat_stream(make_relay: Any, gated: tuple[GatedUpstream, str]) -> None:
    fake, url = gated
    relay = await make_relay(upstream=url)
    async with sdk_for(relay) as sdk:
        created = await sdk.responses.create(model="fake-model", input="hi", background=True)
    resp = await relay.get(f"/chat/{created.id[len('resp_'):]}")
    assert resp.status == 404
    fake.go.set()


class NamedUpstream:
    """A Responses upstream whose ids name it; it records the previous_response_id of each request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.previous: list[Any] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.previous.append(body.get("previous_response_id"))
        self.count += 1
        rid = f"resp_{self.name}{self.count}"
        done = {"id": rid, "object": "response", "status": "completed", "model": "m", "output": [
            {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": self.name, "annotations": []}]}], "usage": None}
        if not body.get("stream"):
            return web.json_response(done)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for seq, (kind, fields) in enumerate([
                ("response.created", {"response": {**done, "status": "in_progress", "output": []}}),
                ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                "delta": self.name}),
                ("response.completed", {"response": done})]):
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}"
                             "\n\n".encode())
        await resp.write_eof()
        return resp


@pytest.fixture
async def two_upstreams(aiohttp_server: Any) -> list[tuple[NamedUpstream, str]]:
    out = []
    for name in ("a", "b"):
        fake = NamedUpstream(name)
        app = web.Application()
        app.router.add_post("/v1/responses", fake.handler)
        server = await aiohttp_server(app)
        out.append((fake, str(server.make_url("/v1"))))
    return out


def pool_config(two: list[tuple[NamedUpstream, str]], **settings: Any) -> Any:
    from relay.config import Config
    from relay.upstream.config import parse_upstreams

    specs = parse_upstreams([{"name": fake.name, "url": url, "models": ["m"]} for fake, url in two], {})
    return Config(upstreams=specs, model="m", rate_limit=0, **settings)


async def test_a_conversation_continues_on_the_upstream_that_made_its_last_response(
        aiohttp_client: Any, two_upstreams: list[tuple[NamedUpstream, str]]) -> None:
    from relay.http.app import make_app

    relay = await aiohttp_client(make_app(pool_config(two_upstreams)))
    async with sdk_for(relay) as sdk:
        first = await sdk.responses.create(model="m", input="hi")
        home = first.output_text  # "a" or "b": the pool's weighted choice
        previous = first.id
        for i in range(8):  # equal weights: without affinity some of these would go to the other one
            stream = i % 2 == 1
            if stream:
                events = [ev async for ev in await sdk.responses.create(model="m", input="more", stream=True,
                                                                        previous_response_id=previous)]
                previous, text = events[-1].response.id, events[-1].response.output_text
            else:
                answer = await sdk.responses.create(model="m", input="more", previous_response_id=previous)
                previous, text = answer.id, answer.output_text
            assert text == home
        # A background response is the relay's own id: the next turn still finds its upstream, and
        # the upstream is given its own id for it.
        kept = await sdk.responses.create(model="m", input="bg", background=True, previous_response_id=previous)
        events = [ev async for ev in await sdk.responses.retrieve(kept.id, stream=True)]
        assert events[-1].response.id == kept.id
        after = await sdk.responses.create(model="m", input="after", previous_response_id=kept.id)
        assert after.output_text == home
    fake = next(f for f, _ in two_upstreams if f.name == home)
    other = next(f for f, _ in two_upstreams if f.name != home)
    assert other.count == 0 and fake.count == 11
    assert fake.previous[-1] == f"resp_{home}10"  # the upstream's own id for it, not the relay's


async def test_a_conversations_api_conversation_stays_on_the_upstream_that_answered_in_it(
        aiohttp_client: Any, two_upstreams: list[tuple[NamedUpstream, str]]) -> None:
    from relay.http.app import make_app

    relay = await aiohttp_client(make_app(pool_config(two_upstreams)))
    async with sdk_for(relay) as sdk:
        first = await sdk.responses.create(model="m", input="hi", conversation="conv_abc")
        home = first.output_text
        for i in range(8):  # equal weights: without affinity some of these would go to the other one
            conversation: Any = "conv_abc" if i % 2 else {"id": "conv_abc"}  # both forms the API takes
            if i % 3 == 0:
                events = [ev async for ev in await sdk.responses.create(model="m", input="more", stream=True,
                                                                        conversation=conversation)]
                text = events[-1].response.output_text
            else:
                text = (await sdk.responses.create(model="m", input="more", conversation=conversation)).output_text
            assert text == home
    other = next(f for f, _ in two_upstreams if f.name != home)
    assert other.count == 0


async def test_a_background_response_s_input_items_are_listed_as_openai_pages_them(
        make_relay: Any, gated: tuple[GatedUpstream, str]) -> None:
    fake, url = gated
    relay = await make_relay(upstream=url)
    given = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}], "id": "msg_mine"},
             {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    async with sdk_for(relay) as sdk:
        created = await sdk.responses.create(model="fake-model", input=given, background=True)
        listed = await sdk.responses.input_items.list(created.id)
        items = [item.to_dict() for item in listed.data]
        # Newest first, each a typed message with content parts, every one with an id.
        assert [(i["role"], i["content"][0]["type"], i["content"][0]["text"]) for i in items] == [
            ("user", "input_text", "and?"), ("assistant", "output_text", "hello"), ("user", "input_text", "hi"),
            ("developer", "input_text", "be brief")]
        assert items[2]["id"] == "msg_mine" and all(i["type"] == "message" and i["id"] for i in items)
        page = await sdk.responses.input_items.list(created.id, order="asc", limit=2)
        assert [i.id for i in page.data] == [items[3]["id"], items[2]["id"]] and page.has_more
        after = await sdk.responses.input_items.list(created.id, order="asc", after=page.data[-1].id)
        assert [i.id for i in after.data] == [items[1]["id"], items[0]["id"]] and not after.has_more
        plain = await sdk.responses.create(model="fake-model", input="just text", background=True)
        one = (await sdk.responses.input_items.list(plain.id)).data
        assert [(i.role, i.content[0].text) for i in one] == [("user", "just text")]  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.input_items.list(created.id, limit=500)
    fake.go.set()
