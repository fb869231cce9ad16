"""GET /healthz (the process answers) and GET /readyz (the upstream is reachable with the key)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from conftest import TEST_KEY, FakeUpstream, RelayFactory

Client = Any


async def test_healthz_answers_while_the_process_runs(relay: Client) -> None:
    resp = await relay.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_readyz_is_ready_when_the_upstream_answers_and_probes_with_the_key(
        relay: Client, upstream: FakeUpstream) -> None:
    resp = await relay.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "ready"
    assert resp.headers["Cache-Control"] == "no-store"
    assert upstream.models_headers[0]["Authorization"] == f"Bearer {TEST_KEY}"


async def test_readyz_polls_share_one_cached_probe(relay: Client, upstream: FakeUpstream) -> None:
    answers = await asyncio.gather(*(relay.get("/readyz") for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert (await relay.get("/readyz")).status == 200
    assert len(upstream.models_headers) == 1


async def test_readyz_is_not_ready_when_the_upstream_refuses_the_key_and_never_shows_it(
        relay: Client, upstream: FakeUpstream) -> None:
    upstream.models_status = 401
    resp = await relay.get("/readyz")
    text = await resp.text()
    assert resp.status == 503
    assert "credentials" in (await resp.json())["reason"]
    assert TEST_KEY not in text and TEST_KEY[-8:] not in text and "fake failure" not in text


async def test_readyz_is_not_ready_when_the_upstream_answers_5xx(relay: Client, upstream: FakeUpstream) -> None:
    upstream.models_status = 502
    resp = await relay.get("/readyz")
    assert resp.status == 503 and "502" in (await resp.json())["reason"]


async def test_readyz_counts_a_404_as_reachable(relay: Client, upstream: FakeUpstream) -> None:
    # Some upstreams (an Azure OpenAI deployment URL) have no /models under their base.
    upstream.models_status = 404
    assert (await relay.get("/readyz")).status == 200


async def test_readyz_is_not_ready_when_the_upstream_is_unreachable(make_relay: RelayFactory) -> None:
    with socket.socket() as probe:  # a loopback port with nothing listening: connect is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        relay = await make_relay(upstream=f"http://127.0.0.1:{port}/v1")
        resp = await relay.get("/readyz")
    assert resp.status == 503 and "unreachable" in (await resp.json())["reason"]
