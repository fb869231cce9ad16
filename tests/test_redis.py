"""Two relay instances sharing one real Redis (in this process: two apps, two servers).

Resume on the other instance, cancel anywhere, presence across instances, the interrupted end
when the producer is gone, shared limits and signed URLs, and Redis lost or restarted while
streams run.  tests/test_redis_process.py does the same with real ``relay serve`` processes
(``kill -9``, ``--workers``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, SSEClient, chunk, sse, text_of, wait_for
from relay.config import Config
from relay.core.redis_store import RedisStore, open_store
from relay.http.appkeys import REGISTRY, STORE

Client = Any

SHORT = {"owner_ttl": 0.6, "presence_ttl": 0.6, "redis_flush_ms": 1.0}


def gated(gate: asyncio.Event, first: list[str], then: list[str]) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        for part in first:
            await fake.send(resp, sse(chunk(part)))
        await gate.wait()
        for part in then:
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(None, finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


async def pair(make_relay: Any, redis: Any, **overrides: Any) -> tuple[Client, Client]:
    settings = {"redis_url": redis.url, **SHORT, **overrides}
    return await make_relay(**settings), await make_relay(**settings)


async def read_until(client: SSEClient, count: int) -> list[Any]:
    events = []
    while len(events) < count:
        event = await client.next()
        assert event is not None, f"the stream ended after {len(events)} events"
        events.append(event)
    return events


def store_of(relay: Client) -> RedisStore:
    store = relay.app[STORE]
    assert isinstance(store, RedisStore)
    return store


async def test_resume_on_the_other_instance_is_byte_exact_and_calls_the_upstream_once(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one ", "two "], ["three ", "four"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    first = SSEClient(resp)
    head = await read_until(first, 3)  # start, one, two
    resp.close()  # the client's connection drops
    # Everything up to here is in Redis once the writer has been (the next event is the proof).
    on_b = await b.get(resp.headers["Location"], headers={"Last-Event-ID": head[1].id})
    assert on_b.status == 200
    follower = SSEClient(on_b)
    replayed = await follower.next()
    assert replayed is not None and (replayed.id, replayed.data) == (head[2].id, head[2].data)
    gate.set()
    rest = [e async for e in _rest(follower)]
    whole = [json.loads(e.data) for e in [*head, *rest]]
    assert text_of(whole) == "one two three four"
    assert whole[-1]["type"] == "done"
    assert upstream.calls == 1
    # Every id on B is the one A gave that event: the next is the previous plus one.
    ids = [int(e.id.rsplit(".", 1)[1]) for e in [*head, *rest]]
    assert ids == list(range(len(ids)))
    # Finished: with its last id, B answers 204 (what stops EventSource).
    done = await b.get(resp.headers["Location"], headers={"Last-Event-ID": rest[-1].id})
    assert done.status == 204


async def _rest(client: SSEClient) -> Any:
    while (event := await client.next()) is not None:
        yield event


async def test_a_lookup_that_misses_looks_again_for_a_stream_not_yet_in_redis(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    # The client has a stream's id from its start event before the producer's writer has put the
    # stream in Redis: a resume sent to another instance in that moment must not get a 404 (which
    # ends an EventSource for good).  Here the stream appears just after the first look misses.
    _, b = await pair(make_relay, redis)
    store = store_of(b)
    real = store.redis.hgetall
    looks: list[str] = []

    async def hgetall(key: str) -> Any:
        looks.append(key)
        found = await real(key)
        if len(looks) == 1 and not found and "late" in key:
            asyncio.get_running_loop().create_task(store.redis.hset(key, mapping={"owner": "", "model": "m"}))
        return found

    store.redis.hgetall = hgetall  # type: ignore[method-assign]
    remote = await store.lookup("late-stream")
    assert remote is not None and remote.id == "late-stream" and remote.end is None
    assert len(looks) == 1  # (the second look goes in a pipeline with Redis's run_id)
    looks.clear()
    assert await store.lookup("never-was") is None  # an unknown id is still unknown, after a second look
    assert len(looks) == 1


async def test_delete_on_the_other_instance_closes_the_producers_upstream_connection(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()  # never set: the upstream would go on forever
    upstream.behaviour = gated(gate, ["one "], ["never"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    reader = SSEClient(resp)
    await read_until(reader, 2)
    await store_of(a).ready(resp.headers["Location"].rsplit("/", 1)[1])
    deleted = await b.delete(resp.headers["Location"])
    assert deleted.status == 204
    async with asyncio.timeout(10):
        await upstream.closed.wait()
    assert upstream.closed_after_chunks == 1
    events = [json.loads(e.data) async for e in _rest(reader)]
    assert events[-1]["code"] == "cancelled"


async def test_a_follower_on_the_other_instance_keeps_the_generation_past_the_grace(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis, resume_grace=0.2)
    resp = await a.post("/chat", json={"prompt": "hi"})
    head = await read_until(SSEClient(resp), 2)
    on_b = await b.get(resp.headers["Location"], headers={"Last-Event-ID": head[1].id})
    follower = SSEClient(on_b)
    resp.close()
    gen = a.app[REGISTRY].get(head[0].id.rsplit(".", 1)[0])
    assert gen is not None
    # The grace runs out on A, which finds B's reader and keeps going.
    await wait_for(lambda: gen.remote, what="A found the reader on B when its grace ran out")
    assert not gen.finished
    gate.set()
    events = [json.loads(e.data) async for e in _rest(follower)]
    assert events[-1] == {"type": "done", "finish_reason": "stop", "usage": None}
    assert text_of(events) == "two"


async def test_a_201_stream_opened_first_on_the_other_instance_counts_as_attached(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis, attach_timeout=0.2)
    made = await a.post("/chat", json={"prompt": "hi"}, headers={"Accept": "application/json"})
    assert made.status == 201
    events_url = (await made.json())["events"]
    on_b = await b.get(events_url)
    follower = SSEClient(on_b)
    start = await follower.next()
    assert start is not None and json.loads(start.data)["type"] == "start"
    gen = a.app[REGISTRY].get((await made.json())["id"])
    assert gen is not None
    await wait_for(lambda: gen.remote, what="A's attach timeout found the reader on B")
    gate.set()
    events = [json.loads(e.data) async for e in _rest(follower)]
    assert text_of(events) == "one two" and events[-1]["type"] == "done"


async def test_the_producer_gone_ends_every_remote_reader_with_one_retriable_interrupted_event(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one ", "two "], ["never"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    head = await read_until(SSEClient(resp), 3)
    store = store_of(a)
    await wait_for(lambda: store.idle(), what="A's events are in Redis")
    # A stops refreshing its owner key and writing (what a kill -9 looks like from Redis).
    for task in store._loops:
        task.cancel()
    location = resp.headers["Location"]
    first = await b.get(location, headers={"Last-Event-ID": head[0].id})
    second = await b.get(location, headers={"Last-Event-ID": head[0].id})
    got = [[e async for e in _rest(SSEClient(r))] for r in (first, second)]
    assert [e.data for e in got[0][:2]] == [head[1].data, head[2].data]
    end = json.loads(got[0][-1].data)
    assert end["type"] == "error" and end["code"] == "interrupted" and end["retriable"] is True
    # Appended once: both readers saw the same event under the same id.
    assert [(e.id, e.data) for e in got[0]] == [(e.id, e.data) for e in got[1]]
    # Its id is the end mark: A's own readers may hold ids past what reached Redis.
    assert got[0][-1].id == f"{head[0].id.rsplit('.', 1)[0]}.end"
    after = await b.get(location, headers={"Last-Event-ID": got[0][-1].id})
    assert after.status == 204
    # A position at or beyond what reached Redis (read from A's memory) gets the same end.
    for seq in (3, 7):
        beyond = await b.get(location, headers={"Last-Event-ID": f"{head[0].id.rsplit('.', 1)[0]}.{seq}"})
        tail = [e async for e in _rest(SSEClient(beyond))]
        assert [(e.id, e.data) for e in tail] == [(got[0][-1].id, got[0][-1].data)]
    gate.set()


async def test_rate_limit_holds_across_instances(redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    a, b = await pair(make_relay, redis, rate_limit=3)
    statuses = []
    for relay in (a, b, a, b, a):
        resp = await relay.post("/v1/chat/completions",
                                json={"model": "fake-model", "stream": True,
                                      "messages": [{"role": "user", "content": "x"}]})
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [200, 200, 200, 429, 429]
    assert upstream.calls == 3


async def test_running_generations_per_client_are_counted_across_instances(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis, max_streams_per_client=1)
    first = await a.post("/chat", json={"prompt": "hi"})
    await read_until(SSEClient(first), 2)
    second = await b.post("/chat", json={"prompt": "hi"})
    assert second.status == 429
    assert "--max-streams-per-client" in (await second.json())["error"]["message"]
    # The lease lives twice the owner TTL unless renewed: after more renewal rounds than fit in
    # that, it is still held (renewed), so B still refuses.
    store = store_of(a)
    rounds = store.refreshes
    await wait_for(lambda: store.refreshes >= rounds + 8, what="A renewed its leases for longer than their TTL")
    assert (await b.post("/chat", json={"prompt": "hi"})).status == 429
    gate.set()
    await first.read()
    await wait_for(lambda: not a.app[REGISTRY].running(), what="the first generation ended")
    # Its lease is given back: B may start one now.
    async with asyncio.timeout(10):
        while (third := await b.post("/chat", json={"prompt": "hi"})).status == 429:
            await asyncio.sleep(0.02)  # the release is one Redis command behind the end
    assert third.status == 200
    await third.read()


async def test_signed_events_url_verifies_on_the_other_instance_and_tokens_are_each_hosts_own(
        redis: Any, make_relay: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    both, only_a = "tok-both-0123456789", "tok-only-a-0123456789"
    tokens_a, tokens_b = tmp_path / "a", tmp_path / "b"
    tokens_a.write_text(f"{both}\n{only_a}\n")
    tokens_b.write_text(f"{both}\n")
    settings = {"redis_url": redis.url, **SHORT}
    a = await make_relay(tokens_file=tokens_a, **settings)
    b = await make_relay(tokens_file=tokens_b, **settings)
    made = await a.post("/chat", json={"prompt": "hi"}, headers={"Accept": "application/json",
                                                                 "Authorization": f"Bearer {both}"})
    url = (await made.json())["events"]
    assert "sig=" in url
    opened = await b.get(url)  # no token: the URL's capability, signed on A
    assert opened.status == 200
    assert text_of([json.loads(e.data) async for e in _rest(SSEClient(opened))]) == "Hello, world!"
    refused = await b.post("/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {only_a}"})
    assert refused.status == 401
    # And another token cannot read A's stream on B either: the same 404 as an unknown id.
    other = await b.get(url.split("?", 1)[0], headers={"Authorization": "Bearer nope"})
    assert other.status == 401


async def test_a_stream_evicted_from_memory_is_served_from_redis(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    a = await make_relay(redis_url=redis.url, retention_bytes=1, **SHORT)
    resp = await a.post("/chat", json={"prompt": "hi"})
    events = [e async for e in _rest(SSEClient(resp))]
    stream_id = events[0].id.rsplit(".", 1)[0]
    await wait_for(lambda: a.app[REGISTRY].get(stream_id) is None, what="the finished stream left memory")
    store = store_of(a)
    await wait_for(lambda: store.idle(), what="its events are in Redis")
    again = await a.get(f"/chat/{stream_id}")
    assert again.status == 200
    assert [(e.id, e.data) async for e in _rest(SSEClient(again))] == [(e.id, e.data) for e in events]


async def test_redis_lost_mid_stream_local_readers_finish_and_resume_works_again_after(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two ", "three"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    reader = SSEClient(resp)
    head = [json.loads(e.data) for e in await read_until(reader, 2)]
    await redis.stop()
    # Remote resume: 503 naming the cause.
    away = await b.get(resp.headers["Location"])
    assert away.status == 503
    assert "Redis" in (await away.json())["error"]["message"]
    gate.set()
    events = head + [json.loads(e.data) async for e in _rest(reader)]
    assert text_of(events) == "one two three" and events[-1]["type"] == "done"
    await redis.start()  # empty: what a Redis without persistence is after a crash
    gate2 = asyncio.Event()
    upstream.behaviour = gated(gate2, ["again "], ["and done"])
    async with asyncio.timeout(20):
        while True:
            fresh = await a.post("/chat", json={"prompt": "hi"})
            head = await read_until(SSEClient(fresh), 2)
            await store_of(a).ready(head[0].id.rsplit(".", 1)[0])
            on_b = await b.get(fresh.headers["Location"], headers={"Last-Event-ID": head[0].id})
            if on_b.status == 200:
                break
            fresh.close()  # Redis not back for A yet (its reconnect is a retry away)
            await asyncio.sleep(0.05)
    gate2.set()
    rest = [json.loads(e.data) async for e in _rest(SSEClient(on_b))]
    assert text_of(rest) == "again and done"


async def test_redis_restarted_empty_running_streams_are_written_again(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], ["two"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    head = await read_until(SSEClient(resp), 2)
    stream_id = head[0].id.rsplit(".", 1)[0]
    await redis.restart()
    store = store_of(a)
    await wait_for(lambda: (store.restarts_seen == 1 and store.idle()
                            and store_key_back(store)),
                   timeout=20, what="A wrote the running stream again")
    await store.ready(stream_id)
    # B may itself have found Redis gone a moment ago: a retriable 503 until it has it back.
    from test_redis_faults import until_resumable

    on_b = await until_resumable(b, f"/chat/{stream_id}", head[0].id)
    gate.set()
    rest = [json.loads(e.data) async for e in _rest(SSEClient(on_b))]
    assert text_of(rest) == "one two"


def store_key_back(store: RedisStore) -> bool:
    return bool(store.writer.owned) and all(m.fence != "0" for m in store.writer.owned.values())


async def test_a_redis_that_evicts_keys_is_refused_at_start(redis: Any) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis.url)
    await client.config_set("maxmemory", "100mb")
    await client.config_set("maxmemory-policy", "allkeys-lru")
    await client.aclose()
    store = open_store(Config(redis_url=redis.url))
    with pytest.raises(SystemExit, match="maxmemory-policy allkeys-lru"):
        await store.start()
    await store.close()


async def test_unreachable_redis_at_start_is_one_line_and_names_no_password(tmp_path: Path) -> None:
    store = open_store(Config(redis_url=f"unix://{tmp_path}/none.sock", redis_password="hunter2-secret"))
    with pytest.raises(SystemExit) as exc:
        await store.start()
    await store.close()
    message = str(exc.value)
    assert message.startswith("relay: error: cannot use Redis at unix://") and "\n" not in message
    assert "hunter2" not in message


async def test_stream_keys_share_one_cluster_slot(redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    a = await make_relay(redis_url=redis.url, redis_prefix="team", **SHORT)
    resp = await a.post("/chat", json={"prompt": "hi"})
    events = [e async for e in _rest(SSEClient(resp))]
    stream_id = events[0].id.rsplit(".", 1)[0]
    store = store_of(a)
    await wait_for(store.idle, what="the stream's end is in Redis")
    keys = sorted(k.decode() for k in await store.redis.keys(f"team:{{{stream_id}}}:*"))
    assert keys == [f"team:{{{stream_id}}}:log", f"team:{{{stream_id}}}:meta"]  # the owner key is gone
    for key in keys:
        ttl = await store.redis.pttl(key)
        assert 0 < ttl <= 300_000  # --stream-ttl once finished
    assert TEST_KEY.encode() not in b"".join([await store.redis.dump(k) or b"" for k in keys])


async def test_an_upstream_cooldown_seen_by_one_instance_is_honoured_by_the_other(
        redis: Any, aiohttp_client: Any, upstream: FakeUpstream) -> None:
    from relay.http.app import make_app
    from relay.http.appkeys import UPSTREAMS
    from relay.upstream.config import UpstreamSpec
    from redis_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the connect is refused
    specs = (UpstreamSpec(name="dead", url=dead, models=(("m", "m"),), priority=0),
             UpstreamSpec(name="live", url=upstream.base_url, models=(("m", "m"),), priority=1))
    settings = dict(upstreams=specs, model="m", rate_limit=0, redis_url=redis.url, cooldown=60, **SHORT)
    a = await aiohttp_client(make_app(Config(**settings)))
    b = await aiohttp_client(make_app(Config(**settings)))
    first = await a.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]})
    assert first.status == 200 and first.headers["x-relay-attempts"] == "2"  # dead, then live
    await first.read()
    pool_b = b.app[UPSTREAMS]
    dead_b = next(m for m in pool_b.members if m.name == "dead")
    await wait_for(lambda: not dead_b.health.usable(time_now()), what="B heard of A's cooldown")
    assert "another instance" in dead_b.health.why
    second = await b.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                         "messages": [{"role": "user", "content": "x"}]})
    assert second.status == 200
    assert second.headers.get("x-relay-attempts", "1") == "1"  # B went straight to the live one
    await second.read()
    assert dead_b.stats.requests == 0 and dead_b.stats.failures == 0


def time_now() -> float:
    import time

    return time.monotonic()


async def test_a_slow_redis_overflows_the_bounded_queue_and_the_stream_is_rewritten_from_memory_after(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    import os
    import signal

    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one "], [f"w{i} " for i in range(20)])
    a, b = await pair(make_relay, redis, redis_queue=5)
    resp = await a.post("/chat", json={"prompt": "hi"})
    reader = SSEClient(resp)
    head = await read_until(reader, 2)
    store = store_of(a)
    await store.ready(head[0].id.rsplit(".", 1)[0])
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)  # Redis stops answering: the writer's pipeline hangs
    try:
        gate.set()
        rest = [json.loads(e.data) async for e in _rest(reader)]  # local readers are not held back
        assert text_of(rest) == "".join(f"w{i} " for i in range(20)) and rest[-1]["type"] == "done"
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    await wait_for(lambda: store.idle(), what="A's writer caught up")
    # The queue's bound cost Redis's copy its events, not memory: the copy was rewritten from
    # the producer's log, so a resume elsewhere gets every event (store_incomplete is only for
    # events that are really gone).
    elsewhere = await b.get(resp.headers["Location"], headers={"Last-Event-ID": head[0].id})
    assert elsewhere.status == 200
    replayed = [json.loads(e.data) async for e in _rest(SSEClient(elsewhere))]
    assert replayed == [json.loads(head[1].data), *rest]


async def test_a_graceful_stop_writes_its_shutdown_ends_so_readers_elsewhere_get_them_not_interrupted(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()  # never set: the answer is still running when A stops
    upstream.behaviour = gated(gate, ["one "], ["never"])
    a, b = await pair(make_relay, redis)
    resp = await a.post("/chat", json={"prompt": "hi"})
    head = await read_until(SSEClient(resp), 2)
    resp.close()
    await a.close()  # A's shutdown: every generation ends with a retriable "shutdown" error
    again = await b.get(resp.headers["Location"], headers={"Last-Event-ID": head[1].id})
    assert again.status == 200
    end = [json.loads(e.data) async for e in _rest(SSEClient(again))]
    assert [(e["type"], e["code"], e["retriable"]) for e in end] == [("error", "shutdown", True)]


async def test_redis_round_trips_and_errors_are_in_the_metrics(
        redis: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from test_metrics import scrape, value

    from relay.http.appkeys import METRICS

    a = await make_relay(redis_url=redis.url, metrics_listen="127.0.0.1:0", **SHORT)
    metrics = a.app[METRICS]
    assert metrics is not None and metrics.url is not None
    events = await SSEClient(await a.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1]["type"] == "done"
    store = store_of(a)
    await store.ready(events[0]["id"])
    async with asyncio.timeout(10):
        while not store.idle():  # the last batch written
            await asyncio.sleep(0.01)
    samples = await scrape(metrics.url)
    assert value(samples, "relay_redis_round_trip_seconds_count", op="write") == store.round_trips >= 1
    assert value(samples, "relay_redis_errors_total", op="write") == 0
    await redis.stop()
    async with asyncio.timeout(20):  # the refresher's next round finds it gone
        while value(await scrape(metrics.url), "relay_redis_errors_total", op="refresh") < 1:
            await asyncio.sleep(0.05)
    await redis.start()


# -- background responses across instances (POST /v1/responses with background: true) ---------

@pytest.fixture
async def gated_responses(aiohttp_server: Any) -> Any:
    from test_responses_background import GatedUpstream

    fake = GatedUpstream(hold=11)
    app = web.Application()
    app.router.add_post("/v1/responses", fake.handler)
    server = await aiohttp_server(app)
    return fake, str(server.make_url("/v1"))


async def background_on(relay: Client, sdk: Any, fake: Any) -> Any:
    """A background response started on ``relay``, its upstream held, what it has made in Redis."""
    created = await sdk.responses.create(model="fake-model", input="hi", background=True)
    async with asyncio.timeout(10):
        await fake.held.wait()
    store = store_of(relay)
    await wait_for(lambda: store.idle(), what="the producer's events are in Redis")
    return created


async def test_a_background_response_is_read_and_followed_on_the_other_instance(
        redis: Any, make_relay: Any, gated_responses: Any) -> None:
    from test_responses import EVENTS, sdk_for

    fake, url = gated_responses
    a, b = await pair(make_relay, redis, upstream=url)
    async with sdk_for(a) as on_a, sdk_for(b) as on_b:
        created = await background_on(a, on_a, fake)
        running = await on_b.responses.retrieve(created.id)
        assert running.id == created.id and running.status == "in_progress"
        fake.go.set()
        events = [ev async for ev in await on_b.responses.retrieve(created.id, stream=True, starting_after=4)]
        assert [ev.sequence_number for ev in events] == list(range(5, len(EVENTS)))
        assert events[-1].type == "response.completed" and events[-1].response.id == created.id
        done = await on_b.responses.retrieve(created.id)
        assert done.status == "completed" and done.output_text == "Hello there"
        # Its input too, listed on the other instance.
        items = (await on_b.responses.input_items.list(created.id)).data
        assert [(i.role, i.content[0].text) for i in items] == [("user", "hi")]  # type: ignore[union-attr]
    assert len(fake.bodies) == 1  # one upstream answer, read on both instances


async def test_a_background_response_whose_producer_died_ends_with_the_retriable_interrupted_event(
        redis: Any, make_relay: Any, gated_responses: Any) -> None:
    from test_responses import sdk_for

    fake, url = gated_responses
    a, b = await pair(make_relay, redis, upstream=url)
    async with sdk_for(a) as on_a, sdk_for(b) as on_b:
        created = await background_on(a, on_a, fake)
        for task in store_of(a)._loops:  # A stops refreshing its owner key and writing: a kill -9, seen from Redis
            task.cancel()
        events = [ev async for ev in await on_b.responses.retrieve(created.id, stream=True)]
        assert [ev.sequence_number for ev in events[:-1]] == list(range(11))
        assert events[-1].type == "error" and events[-1].code == "interrupted"
        after = await on_b.responses.retrieve(created.id)
        assert after.status == "failed" and after.error is not None and after.error.code == "interrupted"
        fake.go.set()


async def test_cancel_on_the_other_instance_closes_the_producers_upstream(
        redis: Any, make_relay: Any, gated_responses: Any) -> None:
    from test_responses import sdk_for

    fake, url = gated_responses
    a, b = await pair(make_relay, redis, upstream=url)
    async with sdk_for(a) as on_a, sdk_for(b) as on_b:
        created = await background_on(a, on_a, fake)
        cancelled = await on_b.responses.cancel(created.id)
        assert cancelled.status == "cancelled"
        async with asyncio.timeout(10):
            await fake.closed.wait()


async def test_a_conversation_made_on_one_instance_continues_on_its_upstream_from_the_other(
        redis: Any, make_relay: Any, aiohttp_server: Any) -> None:
    from test_responses import sdk_for
    from test_responses_background import NamedUpstream
    from relay.upstream.config import parse_upstreams

    two = []
    for name in ("a", "b"):
        fake = NamedUpstream(name)
        app = web.Application()
        app.router.add_post("/v1/responses", fake.handler)
        two.append((fake, str((await aiohttp_server(app)).make_url("/v1"))))
    specs = parse_upstreams([{"name": f.name, "url": url, "models": ["m"]} for f, url in two], {})
    a, b = await pair(make_relay, redis, upstream=None, upstreams=specs, model="m")
    async with sdk_for(a) as on_a, sdk_for(b) as on_b:
        first = await on_a.responses.create(model="m", input="hi")
        home = first.output_text
        previous = first.id
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis.url)
        try:
            async with asyncio.timeout(10):  # A writes where it was made a round trip after it answered
                while not await client.get(f"relay:origin:{first.id}"):
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()
        for _ in range(6):
            answer = await on_b.responses.create(model="m", input="more", previous_response_id=previous)
            assert answer.output_text == home
            previous = answer.id
    assert next(f for f, _ in two if f.name != home).count == 0
