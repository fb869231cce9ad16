"""Shared state that fails soft: Redis stopped, Redis restarted empty, a stale producer, many readers.

Two relay instances in this process share one real ``redis-server``; the faults are real signals
to it (SIGSTOP, SIGKILL).  Each case asserts what every reader saw: the same events, no gap, no
duplicate, and one honest end.  "Answered while Redis is stopped" is asserted by order: Redis is
resumed only after the request was answered, and the test gives up (fails) before the Redis
client's own 10 s socket timeout, which is what every such request waited for before.
tests/test_redis_process.py has the cases that need a relay process of their own (a stopped
producer, a stuck worker).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from conftest import FakeUpstream, SSEClient, chunk, sse, text_of, wait_for
from test_redis import _rest, gated, pair, read_until, store_of

#: The bound on a request's wait for Redis, in these tests.
BOUND = 0.2
#: Less than redis-py's socket timeout (10 s), the wait every request made before the bound.
GIVE_UP = 8.0


@asynccontextmanager
async def stopped(redis: Any) -> AsyncIterator[None]:
    """Redis stopped (SIGSTOP): connections stay open and nothing answers; resumed on the way out."""
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


async def until_resumable(client: Any, location: str, last_id: str) -> aiohttp.ClientResponse:
    """Resume on ``client`` until it answers 200 (a 503 while the copy is being rewritten)."""
    async with asyncio.timeout(20):
        while True:
            resp = await client.get(location, headers={"Last-Event-ID": last_id})
            if resp.status == 200:
                return resp  # type: ignore[no-any-return]
            assert resp.status == 503, await resp.text()
            resp.close()
            await asyncio.sleep(0.05)


async def test_while_redis_is_stopped_requests_are_served_here_and_readers_elsewhere_get_an_honest_end(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one ", "two "], ["three ", "four"])
    a, b = await pair(make_relay, redis, redis_timeout=BOUND)
    resp = await a.post("/chat", json={"prompt": "hi"})
    local = SSEClient(resp)
    head = await read_until(local, 3)
    location = resp.headers["Location"]
    await store_of(a).ready(head[0].id.rsplit(".", 1)[0])
    await wait_for(store_of(a).idle, what="A's events are in Redis")
    elsewhere = await b.get(location, headers={"Last-Event-ID": head[0].id})
    assert elsewhere.status == 200
    remote = SSEClient(elsewhere)
    assert [e.id for e in await read_until(remote, 2)] == [head[1].id, head[2].id]
    async with stopped(redis):
        async with asyncio.timeout(GIVE_UP):
            # The reader elsewhere: one retriable error with no id of its own (its last event id
            # stays its last real event's), then the end of the response: never a silent cut.
            cut = await remote.next()
            assert cut is not None and cut.id == head[2].id and b"id:" not in remote.raw.rsplit(b"\n\n", 2)[-2]
            assert json.loads(cut.data)["code"] == "store_unavailable" and json.loads(cut.data)["retriable"] is True
            assert await remote.next() is None
            # New streams start at once, both kinds.
            created = await a.post("/chat", json={"prompt": "x"}, headers={"Accept": "application/json"})
            assert created.status == 201
            streamed = await a.post("/chat", json={"prompt": "x"})
            assert streamed.status == 200
            assert (await SSEClient(streamed).next_json() or {}).get("type") == "start"
            streamed.close()
            # A resume of a stream held here comes from memory; one held elsewhere gets a retriable 503.
            here = await a.get(location, headers={"Last-Event-ID": head[1].id})
            assert here.status == 200 and (await SSEClient(here).next() or head[0]).id == head[2].id
            here.close()
            away = await b.get(location, headers={"Last-Event-ID": head[0].id})
            assert away.status == 503 and "Retry-After" in away.headers
            assert (await away.json())["error"]["code"] == "store_unavailable"
            # The producer goes on for its own reader.
            gate.set()
            rest = [e async for e in _rest(local)]
            assert text_of([json.loads(e.data) for e in [*head, *rest]]) == "one two three four"
    # Redis back: the copy that fell behind (the stream finished meanwhile) is rewritten from
    # memory, and the reader elsewhere reconnects from its last real event onto all of it.
    again = await until_resumable(b, location, head[2].id)
    tail = [e async for e in _rest(SSEClient(again))]
    assert [(e.id, e.data) for e in tail] == [(e.id, e.data) for e in rest]
    assert json.loads(tail[-1].data)["type"] == "done"


async def test_redis_restarted_empty_gets_back_every_stream_held_here_running_or_finished(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis, redis_timeout=BOUND)
    finished = await a.post("/chat", json={"prompt": "first"})
    gate.set()
    whole = [e async for e in _rest(SSEClient(finished))]
    gate.clear()
    running = await a.post("/chat", json={"prompt": "second"})
    head = await read_until(SSEClient(running), 2)
    await wait_for(store_of(a).idle, what="A's events are in Redis")
    await redis.restart()  # SIGKILL, and a new, empty Redis at the same address
    got = await until_resumable(b, finished.headers["Location"], whole[0].id)
    assert [(e.id, e.data) for e in [e async for e in _rest(SSEClient(got))]] == \
        [(e.id, e.data) for e in whole[1:]]
    follower = await until_resumable(b, running.headers["Location"], head[0].id)
    gate.set()
    rest = [e async for e in _rest(SSEClient(follower))]
    assert [e.id for e in rest][0] == head[1].id
    assert text_of([json.loads(e.data) for e in rest]) == "one two"


async def test_an_upstream_cooldown_is_known_to_an_instance_that_starts_later(
        redis: Any, aiohttp_client: Any, upstream: FakeUpstream) -> None:
    from redis_server import free_port
    from relay.config import Config
    from relay.http.app import make_app
    from relay.http.appkeys import UPSTREAMS
    from relay.upstream.config import UpstreamSpec

    dead = f"http://127.0.0.1:{free_port()}/v1"
    specs = (UpstreamSpec(name="dead", url=dead, models=(("m", "m"),), priority=0),
             UpstreamSpec(name="live", url=upstream.base_url, models=(("m", "m"),), priority=1))
    settings = dict(upstreams=specs, model="m", rate_limit=0, redis_url=redis.url, cooldown=60,
                    owner_ttl=0.6, presence_ttl=0.6)
    a = await aiohttp_client(make_app(Config(**settings)))
    first = await a.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]})
    assert first.headers["x-relay-attempts"] == "2"
    await first.read()
    import redis.asyncio as aioredis

    probe = aioredis.Redis.from_url(redis.url)
    try:
        await wait_for_async(lambda: probe.exists("relay:cooldown:dead"), what="A's cooldown is in Redis")
    finally:
        await probe.aclose()
    # B starts after the news went by on the channel: it knows from the key.
    b = await aiohttp_client(make_app(Config(**settings)))
    dead_b = next(m for m in b.app[UPSTREAMS].members if m.name == "dead")
    await wait_for(lambda: dead_b.health.until > 0, what="B read the cooldown at start")
    second = await b.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                         "messages": [{"role": "user", "content": "x"}]})
    assert second.headers.get("x-relay-attempts", "1") == "1"
    await second.read()
    assert dead_b.stats.requests == 0


async def wait_for_async(check: Any, what: str) -> None:
    async with asyncio.timeout(10):
        while not await check():
            await asyncio.sleep(0.01)


async def test_closing_the_store_does_not_wait_for_a_stopped_redis(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, _ = await pair(make_relay, redis, redis_timeout=BOUND)
    resp = await a.post("/chat", json={"prompt": "hi"})
    await read_until(SSEClient(resp), 2)
    store = store_of(a)
    async with stopped(redis):
        gate.set()
        await resp.read()
        # The end is queued for a Redis that does not answer: close gives up once it knows.
        async with asyncio.timeout(GIVE_UP / 2):
            await a.close()
    assert not store.available


async def test_many_readers_elsewhere_share_one_blocking_read(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    import redis.asyncio as aioredis

    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis, redis_timeout=BOUND, max_connections_per_client=2000)
    streams = []
    for i in range(5):
        resp = await a.post("/chat", json={"prompt": f"s{i}"})
        streams.append((resp, await read_until(SSEClient(resp), 2)))
    await wait_for(store_of(a).idle, what="A's events are in Redis")
    readers = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
        for i in range(500):  # 100 readers on each of 5 streams, all on B
            resp, head = streams[i % 5]
            got = await many.get(b.make_url(resp.headers["Location"]), headers={"Last-Event-ID": head[0].id})
            assert got.status == 200
            reader = SSEClient(got)
            assert (await reader.next() or head[0]).id == head[1].id
            readers.append(reader)
        probe = aioredis.Redis.from_url(redis.url)
        try:
            clients = await probe.client_list()
        finally:
            await probe.aclose()
        # A and B each: the command pool's few, the news channel, the followers' one read.
        assert len(clients) < 40, len(clients)
        assert store_of(b).followers.streams == 5
        gate.set()
        for reader in readers:
            rest = [json.loads(e.data) async for e in _rest(reader)]
            assert text_of(rest) == "two" and rest[-1]["type"] == "done"


def _refuse_scripts(redis: Any) -> None:
    """Redis refuses every script from now on (ACL: NOPERM): it answers, but says no."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(redis.socket_path))
        sock.sendall(b"ACL SETUSER default -evalsha -eval\r\n")
        assert sock.recv(64).startswith(b"+OK")


async def test_a_lease_redis_refuses_to_confirm_lets_the_stream_go_on_as_while_redis_is_away(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    # The lease lapses while Redis refuses the writes and renewals (it answers, so it is not
    # away); the producer then holds what the upstream sends until Redis confirms the lease.  A
    # refusal is no confirmation either way: the stream goes on for its readers, as while Redis
    # is away, rather than ending it as the relay's own internal error.
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, _ = await pair(make_relay, redis, redis_timeout=BOUND, owner_ttl=0.5)
    resp = await a.post("/chat", json={"prompt": "hi"})
    local = SSEClient(resp)
    head = await read_until(local, 2)
    store = store_of(a)
    await wait_for(store.idle, what="the stream is in Redis")
    copy = store.writer.owned[head[0].id.rsplit(".", 1)[0]]
    _refuse_scripts(redis)
    await wait_for(lambda: not copy.leased(), what="the lease has lapsed")
    gate.set()
    async with asyncio.timeout(GIVE_UP):
        rest = [json.loads(e.data) async for e in _rest(local)]
    assert text_of(rest) == "two", rest
    assert rest[-1]["type"] == "done"
