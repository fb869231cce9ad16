"""One generation core behind /chat and /v1: one cap, bounded retention, every read under a deadline.

(The drain, the same for both endpoints, is tested with real processes in tests/test_shutdown.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, sse, text_of, wait_for

Client = Any
V1 = "/v1/chat/completions"


def v1_body(prompt: str) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], "stream": True}


# -- One cap for both endpoints ------------------------------------------------------------

def held() -> Any:
    """An upstream that sends a first delta and then waits for ``fake.release``."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("first", role="assistant")))
        await fake.release.wait()
        await fake.send(resp, sse(chunk(" end", finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


async def test_a_running_v1_stream_counts_against_max_streams_for_chat(make_relay: Any,
                                                                       upstream: FakeUpstream) -> None:
    upstream.behaviour = held()
    relay = await make_relay(max_streams=1)
    v1 = SSEClient(await relay.post(V1, json=v1_body("hi")))
    assert v1.resp.status == 200 and await v1.next() is not None
    health = await (await relay.get("/healthz")).json()
    assert health["live_streams"] == 1
    resp = await relay.post("/chat", json={"prompt": "x"})
    assert resp.status == 503 and "limit of 1 live streams" in (await resp.json())["error"]["message"]
    upstream.release.set()
    assert (await v1.all_data())[-1] == "[DONE]"
    assert upstream.calls == 1  # the refused /chat request never reached the upstream


async def test_a_running_chat_stream_counts_against_max_streams_for_v1(make_relay: Any,
                                                                       upstream: FakeUpstream) -> None:
    upstream.behaviour = held()
    relay = await make_relay(max_streams=1)
    chat = SSEClient(await relay.post("/chat", json={"prompt": "hi"}))
    assert (await chat.next_json() or {})["type"] == "start"
    resp = await relay.post(V1, json=v1_body("x"))
    assert resp.status == 503
    upstream.release.set()
    assert (await chat.all())[-1]["type"] == "done"


async def test_a_v1_stream_is_not_reachable_through_the_chat_routes(make_relay: Any,
                                                                    upstream: FakeUpstream) -> None:
    from relay.http.appkeys import REGISTRY

    upstream.behaviour = held()
    relay = await make_relay()
    v1 = SSEClient(await relay.post(V1, json=v1_body("hi")))
    assert await v1.next() is not None
    [gen] = relay.app[REGISTRY].running()
    assert gen.kind == "v1"
    assert (await relay.get(f"/chat/{gen.id}")).status == 404
    assert (await relay.delete(f"/chat/{gen.id}")).status == 404
    upstream.release.set()
    assert (await v1.all_data())[-1] == "[DONE]"
    await wait_for(lambda: relay.app[REGISTRY].live == 0)
    assert len(relay.app[REGISTRY]) == 0  # not retained once finished


# -- Bounded retention of finished streams --------------------------------------------------

async def test_finished_streams_are_kept_within_a_byte_budget_oldest_evicted_first(make_relay: Any) -> None:
    relay = await make_relay(retention_bytes=4096, stream_ttl=600)
    ids = []
    for i in range(12):
        events = await SSEClient(await relay.post("/chat", json={"prompt": f"p{i}"})).all()
        assert events[-1]["type"] == "done"
        ids.append(events[0]["id"])
    from relay.http.appkeys import REGISTRY

    registry = relay.app[REGISTRY]
    await wait_for(lambda: registry.live == 0)
    assert 0 < registry.kept_bytes <= 4096
    # The newest is still there to replay; the oldest is gone, answered like an expired one.
    newest = await SSEClient(await relay.get(f"/chat/{ids[-1]}")).all()
    assert text_of(newest) == "Hello, world!"
    oldest = await relay.get(f"/chat/{ids[0]}")
    assert oldest.status == 404
    assert "unknown or the stream has expired" in (await oldest.json())["error"]["message"]


def test_retention_bytes_is_a_setting_with_a_flag_and_rejects_zero() -> None:
    import pytest

    from relay.config import ConfigError
    from relay.run.cli import config_from_args
    from relay.run.flags import build_parser

    args = build_parser().parse_args(["serve", "--retention-bytes", "1000"])
    assert config_from_args(args, {}).retention_bytes == 1000
    with pytest.raises(ConfigError, match="--retention-bytes"):
        config_from_args(build_parser().parse_args(["serve", "--retention-bytes", "0"]), {})


# -- Every upstream read under a deadline, error bodies included ----------------------------

def error_headers_then_silence() -> Any:
    """500 with a JSON content type and a length, then no body until ``fake.release``."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await fake.release.wait()
        return resp
    return run


async def test_an_error_body_that_never_arrives_ends_chat_within_the_timeout(make_relay: Any,
                                                                            upstream: FakeUpstream) -> None:
    upstream.behaviour = error_headers_then_silence()
    relay = await make_relay(first_token_timeout=600, idle_timeout=0.2, total_timeout=900)
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] in ("upstream_timeout", "upstream_error") and events[-1]["status"] == 500
    assert not upstream.release.is_set()  # it came while the upstream still held its body back
    await asyncio.wait_for(upstream.closed.wait(), 10)


async def test_an_error_body_that_never_arrives_ends_v1_within_the_timeout(make_relay: Any,
                                                                          upstream: FakeUpstream) -> None:
    upstream.behaviour = error_headers_then_silence()
    relay = await make_relay(first_token_timeout=600, idle_timeout=0.2, total_timeout=900, keepalive=600)
    for stream in (True, False):
        resp = await relay.post(V1, json={**v1_body("hi"), "stream": stream})
        assert resp.status == 500
        assert "error" in await resp.json()
    assert not upstream.release.is_set()


async def test_a_v1_client_that_leaves_mid_stream_is_logged_as_cancelled(
        make_relay: Any, upstream: FakeUpstream, caplog: Any) -> None:
    import logging

    from relay.http.appkeys import REGISTRY

    async def steady(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        while True:  # until the relay closes the connection
            await fake.send(resp, sse(chunk("tick")))
            await asyncio.sleep(0.005)  # the upstream's pace, not synchronisation
    upstream.behaviour = steady
    relay = await make_relay()
    caplog.set_level(logging.INFO, logger="relay.generation")
    for _ in range(5):  # the client may be found gone by its handler or by the producer's write
        upstream.closed.clear()
        client = SSEClient(await relay.post(V1, json=v1_body("hi")))
        assert await client.next() is not None
        client.resp.close()
        await asyncio.wait_for(upstream.closed.wait(), 10)
        await wait_for(lambda: relay.app[REGISTRY].live == 0)
    outcomes = [r.getMessage().split("outcome=")[1].split()[0] for r in caplog.records if "outcome=" in r.getMessage()]
    assert outcomes == ["cancelled"] * 5


async def test_a_generation_whose_client_left_is_freed_without_the_cyclic_gc(make_relay: Any,
                                                                             upstream: FakeUpstream) -> None:
    """Cycles through a cancelled producer's task made every disconnect garbage for the cyclic GC,
    whose pauses were most of the disconnect tail in the benchmark."""
    import gc

    from conftest import open_connections
    from relay.core.generation import Generation
    from relay.http.appkeys import REGISTRY

    upstream.behaviour = held()
    relay = await make_relay(resume_grace=0)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for path, body in ((V1, v1_body("hi")), ("/chat", {"prompt": "hi"})):
            client = SSEClient(await relay.post(path, json=body))
            assert await client.next() is not None
            client.resp.close()
            await wait_for(lambda: relay.app[REGISTRY].live == 0)
            await wait_for(lambda: open_connections(relay.server) == 0)
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, Generation)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
