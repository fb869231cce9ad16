"""The Redis store on a real Redis Cluster: three masters with a replica each (tests/redis_server.py).

Resume, cancel, presence, limits and cooldowns across two instances, and a master killed
mid-stream: the replica takes over, the producer rewrites what the replica lacked from memory,
and a reader elsewhere ends up with every event once and one end (through one honest,
retriable error and a reconnect if its read was on the master that died).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import FakeUpstream, SSEClient, text_of, wait_for
from test_redis import _rest, gated, read_until, store_of

SHORT = {"owner_ttl": 0.6, "presence_ttl": 0.6, "redis_flush_ms": 1.0, "redis_timeout": 0.5}


async def cluster_pair(make_relay: Any, cluster: Any, **overrides: Any) -> tuple[Any, Any]:
    settings = {"redis_url": cluster.url, **SHORT, **overrides}
    return await make_relay(**settings), await make_relay(**settings)


async def test_resume_cancel_and_presence_across_instances_on_a_cluster(
        redis_cluster: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, ["one ", "two "], ["three"])
    a, b = await cluster_pair(make_relay, redis_cluster)
    assert store_of(a).cluster
    resp = await a.post("/chat", json={"prompt": "hi"})
    head = await read_until(SSEClient(resp), 3)
    resp.close()  # A's own reader leaves: B's follower keeps it going past the grace
    on_b = await b.get(resp.headers["Location"], headers={"Last-Event-ID": head[0].id})
    assert on_b.status == 200
    follower = SSEClient(on_b)
    assert [(e.id, e.data) for e in await read_until(follower, 2)] == [(e.id, e.data) for e in head[1:]]
    gate.set()
    rest = [json.loads(e.data) async for e in _rest(follower)]
    assert text_of(rest) == "three" and rest[-1]["type"] == "done"
    assert upstream.calls == 1
    # Cancel on the other instance reaches the producer (pub/sub on the cluster).
    gate.clear()
    second = await a.post("/chat", json={"prompt": "again"})
    shead = await read_until(SSEClient(second), 2)
    stream_id = shead[0].id.rsplit(".", 1)[0]
    await wait_for(store_of(a).idle, what="A's copy is in the cluster")
    stopped = await b.delete(f"/chat/{stream_id}")
    assert stopped.status == 204
    end = [json.loads(e.data) async for e in _rest(SSEClient(second))]
    assert end[-1]["code"] == "cancelled"


async def test_limits_and_cooldowns_hold_across_instances_on_a_cluster(
        redis_cluster: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    a, b = await cluster_pair(make_relay, redis_cluster, rate_limit=2)
    codes = []
    for client in (a, b, a):
        resp = await client.post("/chat", json={"prompt": "x"}, headers={"Accept": "application/json"})
        codes.append(resp.status)
    assert codes == [201, 201, 429]
    # A cooldown A starts reaches B by the channel and an instance started later by its key.
    from relay.http.appkeys import UPSTREAMS

    pool_a = a.app[UPSTREAMS]
    name = pool_a.members[0].name
    store_of(a).news._publish_health(name, 30.0, "HTTP 500", False)
    member_b = b.app[UPSTREAMS].members[0]
    await wait_for(lambda: member_b.health.until > 0, what="B heard A's cooldown")
    c = await make_relay(redis_url=redis_cluster.url, **SHORT)
    member_c = c.app[UPSTREAMS].members[0]
    await wait_for(lambda: member_c.health.until > 0, what="C, started later, read the cooldown's key")
    assert "another instance" in member_c.health.why


async def test_a_master_killed_mid_stream_leaves_readers_every_event_once_and_one_end(
        redis_cluster: Any, make_relay: Any, upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    upstream.behaviour = gated(gate, [f"a{i} " for i in range(5)], [f"b{i} " for i in range(5)])
    a, b = await cluster_pair(make_relay, redis_cluster)
    resp = await a.post("/chat", json={"prompt": "hi"})
    local = SSEClient(resp)
    head = await read_until(local, 6)
    stream_id = head[0].id.rsplit(".", 1)[0]
    await wait_for(store_of(a).idle, what="A's copy is in the cluster")
    location = resp.headers["Location"]
    far = await b.get(location, headers={"Last-Event-ID": head[0].id})
    assert far.status == 200
    seen = [e async for e in _take(SSEClient(far), 5)]
    master = await redis_cluster.master_of(f"relay:{{{stream_id}}}:log")
    await master.stop()  # SIGKILL: its replica is promoted after the node timeout
    gate.set()
    rest_local = [e async for e in _rest(local)]
    assert json.loads(rest_local[-1].data)["type"] == "done"
    # The reader elsewhere: the rest (if its read survived) or one retriable error, after which
    # it reconnects from its last id, as often as the failover takes.
    reader = SSEClient(far)
    async with asyncio.timeout(60):
        while True:
            event = None
            async for event in _rest(reader):
                seen.append(event)
            last = seen[-1]
            body = json.loads(last.data)
            if body["type"] == "done":
                break
            if body.get("code") == "store_unavailable":
                seen.pop()  # a retriable end of this connection, not of the stream
            while True:
                again = await b.get(location, headers={"Last-Event-ID": seen[-1].id})
                if again.status == 200:
                    break
                assert again.status == 503
                again.close()
                await asyncio.sleep(0.1)
            reader = SSEClient(again)
    everything = [*head[:1], *seen]
    assert [(e.id, e.data) for e in everything] == [(e.id, e.data) for e in [*head, *rest_local]]


async def _take(reader: SSEClient, count: int) -> Any:
    for _ in range(count):
        event = await reader.next()
        assert event is not None
        yield event

