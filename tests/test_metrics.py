"""Metrics: scraped from the metrics listener with a real HTTP client, parsed with
prometheus-client's own text parser; after a known sequence every counter moved by exactly what
happened.  The public port shows none of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from conftest import FakeUpstream, SSEClient, chunk, paused, sse, tokens, wait_for
from relay.core.ids import new_stream_id
from relay.http.appkeys import METRICS, REGISTRY

pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample that changed, by how much (histogram buckets left out: their _count says it)."""
    out = {}
    for key in set(before) | set(after):
        if key[0].endswith(("_bucket", "_created")):
            continue
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        if delta:
            out[key] = delta
    return out


def url_of(relay: Client) -> str:
    metrics = relay.server.app[METRICS]
    assert metrics is not None and metrics.url is not None
    return metrics.url


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def held(first: str, more: list[str]) -> Callable[..., Any]:
    """``first``, then on ``fake.release`` each of ``more``, then silence (never finishing)."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk(first, role="assistant")))
        await fake.release.wait()
        for part in more:
            await fake.send(resp, sse(chunk(part)))
        await asyncio.Event().wait()
        return resp
    return run


async def test_metrics_are_on_their_own_listener_and_the_public_port_has_none(make_relay: Any) -> None:
    relay = await make_relay(metrics_listen="127.0.0.1:0")
    assert (await relay.get("/metrics")).status == 404
    samples = await scrape(url_of(relay))
    assert ("relay_keepalives_sent_total", frozenset()) in samples


async def test_without_the_flag_there_are_no_metrics(make_relay: Any) -> None:
    relay = await make_relay()
    assert relay.server.app[METRICS] is None
    assert (await relay.get("/metrics")).status == 404


async def test_a_known_sequence_moves_each_counter_by_exactly_what_happened(
        make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(metrics_listen="127.0.0.1:0", max_body=4096, resume_grace=30)
    url = url_of(relay)
    before = await scrape(url)

    # 1. A finished /chat stream: 4 deltas, usage 3 + 4.
    upstream.behaviour = tokens(["a", "b", "c", "d"])
    resp = await relay.post("/chat", json={"prompt": "hi"})
    finished = await SSEClient(resp).all()
    stream_id = finished[0]["id"]
    assert finished[-1]["type"] == "done"
    # 2. Resumes: one replayed, one that had the end (204), one unknown (404).
    again = await relay.get(f"/chat/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.1"})
    assert again.status == 200
    await again.read()
    last = len(finished) - 1
    assert (await relay.get(f"/chat/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.{last}"})).status == 204
    unknown = new_stream_id()
    assert (await relay.get(f"/chat/{unknown}", headers={"Last-Event-ID": f"{unknown}.3"})).status == 404
    # 3. Refusals: a body that is not JSON, one over --max-body, a method the route does not have.
    assert (await relay.post("/chat", data=b"{nope", headers={"Content-Type": "application/json"})).status == 400
    assert (await relay.post("/chat", data=b"x" * 5000, headers={"Content-Type": "application/json"})).status == 413
    assert (await relay.put("/chat")).status == 405
    # 4. A /v1 client that leaves after the first chunk: the upstream is closed for nobody.
    upstream.behaviour = held("one", [])
    upstream.release.clear()
    v1 = await relay.post("/v1/chat/completions", json={"model": "fake-model", "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]})
    reader = SSEClient(v1)
    assert await reader.next() is not None
    v1.close()
    await asyncio.wait_for(upstream.closed.wait(), 10)
    await wait_for(lambda: not relay.server.app[REGISTRY].running(), what="the /v1 generation ended")
    # 5. The upstream answers 429: a failover-able failure, with nothing left to fail over to.
    upstream.closed.clear()

    async def too_many(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429)
    upstream.behaviour = too_many
    refused = await relay.post("/v1/chat/completions", json={"model": "fake-model", "stream": True,
                                                             "messages": [{"role": "user", "content": "x"}]})
    assert refused.status == 429
    await wait_for(lambda: not relay.server.app[REGISTRY].running(), what="the 429 generation ended")

    after = await scrape(url)
    changed = moved(before, after)
    up = "upstream"
    expected = {
        key("relay_generations_started_total", endpoint="chat", model="fake-model"): 1,
        key("relay_generations_started_total", endpoint="v1", model="fake-model"): 2,
        key("relay_generations_finished_total", endpoint="chat", model="fake-model", upstream=up, outcome="done"): 1,
        key("relay_generations_finished_total", endpoint="v1", model="fake-model", upstream=up,
            outcome="cancelled"): 1,
        key("relay_generations_finished_total", endpoint="v1", model="fake-model", upstream="-",
            outcome="upstream_error"): 1,
        key("relay_time_to_first_token_seconds_count", endpoint="chat", model="fake-model", upstream=up): 1,
        key("relay_time_to_first_token_seconds_count", endpoint="v1", model="fake-model", upstream=up): 1,
        # Four deltas: three gaps between them.
        key("relay_time_between_chunks_seconds_count", endpoint="chat", model="fake-model"): 3,
        key("relay_stream_duration_seconds_count", endpoint="chat", model="fake-model", outcome="done"): 1,
        key("relay_stream_duration_seconds_count", endpoint="v1", model="fake-model", outcome="cancelled"): 1,
        key("relay_stream_duration_seconds_count", endpoint="v1", model="fake-model", outcome="upstream_error"): 1,
        key("relay_tokens_total", model="fake-model", upstream=up, type="prompt"): 3,
        key("relay_tokens_total", model="fake-model", upstream=up, type="completion"): 4,
        key("relay_upstream_requests_total", upstream=up, status="200"): 2,
        key("relay_upstream_requests_total", upstream=up, status="429"): 1,
        key("relay_upstream_failovers_total", upstream=up): 1,
        key("relay_resumes_total", result="replayed"): 1,
        key("relay_resumes_total", result="no_content"): 1,
        key("relay_resumes_total", result="not_found"): 1,
        key("relay_requests_refused_total", reason="invalid"): 1,
        key("relay_requests_refused_total", reason="size"): 1,
        key("relay_requests_refused_total", reason="method"): 1,
        key("relay_client_disconnects_total", endpoint="v1"): 1,
        key("relay_upstream_closed_unheard_total", endpoint="v1"): 1,
    }
    sums = {k: v for k, v in changed.items() if k[0].endswith("_sum")}
    assert all(v > 0 for v in sums.values())
    assert {k: v for k, v in changed.items() if not k[0].endswith("_sum")} == expected
    # Gauges are back where they were: nothing running, nobody reading.
    for endpoint in ("chat", "v1"):
        assert value(after, "relay_streams_live", endpoint=endpoint) == 0
        assert value(after, "relay_subscribers_live", endpoint=endpoint) == 0


async def test_events_read_after_the_last_client_left_are_counted_when_nobody_came_back(
        make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(metrics_listen="127.0.0.1:0", resume_grace=2)
    url = url_of(relay)
    before = await scrape(url)
    upstream.behaviour = held("one", ["two", "three"])
    resp = await relay.post("/chat", json={"prompt": "hi"})
    reader = SSEClient(resp)
    for _ in range(2):  # start, "one"
        assert await reader.next() is not None
    (gen,) = relay.server.app[REGISTRY].running()
    seen = gen.next_seq
    resp.close()
    await wait_for(lambda: gen.subscribers == 0, what="the client detached")
    upstream.release.set()  # two more chunks while nobody listens, within the grace
    await wait_for(lambda: gen.next_seq == seen + 2, what="the relay read the two chunks")
    assert not upstream.closed.is_set()
    await asyncio.wait_for(upstream.closed.wait(), 10)  # the grace ran out
    after = await scrape(url)
    assert value(after, "relay_upstream_closed_unheard_total", endpoint="chat") - \
        value(before, "relay_upstream_closed_unheard_total", endpoint="chat") == 1
    assert value(after, "relay_events_unrelayed_total", endpoint="chat") - \
        value(before, "relay_events_unrelayed_total", endpoint="chat") == 2


async def test_a_model_a_client_names_is_a_label_only_if_configured(make_relay: Any, upstream: FakeUpstream) -> None:
    relay = await make_relay(metrics_listen="127.0.0.1:0")
    url = url_of(relay)
    await (await relay.post("/chat", json={"prompt": "hi", "model": "anything-1234"})).read()
    await wait_for(lambda: not relay.server.app[REGISTRY].running(), what="the stream ended")
    samples = await scrape(url)
    assert value(samples, "relay_generations_started_total", endpoint="chat", model="other") == 1
    assert not any(("model", "anything-1234") in labels for _, labels in samples)


async def test_first_token_timeout_is_counted_by_phase(make_relay: Any, upstream: FakeUpstream) -> None:
    async def silent(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await asyncio.Event().wait()
        return resp
    upstream.behaviour = silent
    relay = await make_relay(metrics_listen="127.0.0.1:0", first_token_timeout=0.3)
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_timeout"
    samples = await scrape(url_of(relay))
    assert value(samples, "relay_upstream_timeouts_total", upstream="upstream", phase="first_token") == 1
    assert value(samples, "relay_generations_finished_total", endpoint="chat", model="fake-model", upstream="-",
                 outcome="upstream_timeout") == 1


async def test_each_keepalive_sent_is_counted(make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("one", " two")
    relay = await make_relay(metrics_listen="127.0.0.1:0", keepalive=0.05)
    url = url_of(relay)
    reader = SSEClient(await relay.post("/chat", json={"prompt": "hi"}))
    for _ in range(2):  # start, "one"
        assert await reader.next() is not None
    async with asyncio.timeout(10):
        while value(await scrape(url), "relay_keepalives_sent_total") < 2:
            await asyncio.sleep(0.05)
    upstream.release.set()
    events = await reader.all()
    assert events[-1]["type"] == "done"
    # Exactly the keepalives the client received.
    assert value(await scrape(url), "relay_keepalives_sent_total") == bytes(reader.raw).count(b":keepalive\n") >= 2


async def test_the_loop_lag_is_sampled(make_relay: Any) -> None:
    relay = await make_relay(metrics_listen="127.0.0.1:0")
    url = url_of(relay)

    async def sampled() -> bool:
        return value(await scrape(url), "relay_event_loop_lag_seconds_count") >= 1
    async with asyncio.timeout(10):
        while not await sampled():
            await asyncio.sleep(0.1)


async def test_a_resume_from_a_position_no_longer_kept_is_counted_as_expired(
        make_relay: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["x" * 200] * 6)
    relay = await make_relay(metrics_listen="127.0.0.1:0", replay_bytes=512)
    events = await SSEClient(await relay.post("/chat", json={"prompt": "hi"})).all()
    stream_id = events[0]["id"]
    resp = await relay.get(f"/chat/{stream_id}", headers={"Last-Event-ID": f"{stream_id}.0"})
    body = await resp.read()
    assert b"resume_expired" in body
    samples = await scrape(url_of(relay))
    assert value(samples, "relay_resumes_total", result="resume_expired") == 1


async def test_metrics_listen_is_checked(make_relay: Any) -> None:
    from relay.config import Config, ConfigError

    for bad in ("nowhere:99999", "host.example:9100", "127.0.0.1:x"):
        with pytest.raises(ConfigError, match="--metrics-listen"):
            Config(metrics_listen=bad)
    with pytest.raises(ConfigError, match="never the public port"):
        Config(port=8080, metrics_listen="127.0.0.1:8080")
    assert Config(metrics_listen="9100").metrics_listen == "9100"


def test_json_log_lines_carry_the_stream_fields() -> None:
    import logging

    from relay.core.logline import log_finished
    from relay.logformat import JsonFormatter

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
    logger = logging.getLogger("relay.test-json")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    log_finished(logger, "chat", "abc", "m", "done", started=1.0, first_delta=1.25, now=3.0, deltas=4, nbytes=99,
                 usage={"prompt_tokens": 3, "completion_tokens": 4,
                        "completion_tokens_details": {"reasoning_tokens": 2}},
                 attempts=["a:503", "b:ok"], client="127.0.0.1", status=200)
    line = json.loads(JsonFormatter("2").format(records[0]))
    assert line["level"] == "info" and line["logger"] == "relay.test-json" and line["worker"] == 2
    assert line["message"].startswith("chat abc model=m outcome=done ttft=250ms duration=2000ms")
    assert {k: line[k] for k in ("id", "endpoint", "client", "model", "upstream", "tried", "status", "outcome",
                                 "ttft_ms", "duration_ms", "deltas", "bytes", "tokens")} == {
        "id": "abc", "endpoint": "chat", "client": "127.0.0.1", "model": "m", "upstream": "b", "tried": "a:503",
        "status": 200, "outcome": "done", "ttft_ms": 250, "duration_ms": 2000, "deltas": 4, "bytes": 99,
        "tokens": {"prompt": 3, "completion": 4, "reasoning": 2}}
    assert line["time"].endswith("+00:00")


async def test_late_request_heads_and_refused_connections_are_counted(upstream: FakeUpstream) -> None:
    from conftest import TEST_KEY
    from relay.config import Config
    from relay.run.server import start

    runner, _ = await start(Config(upstream=upstream.base_url, api_key=TEST_KEY, model="fake-model", port=0,
                                   header_timeout=0.3, keepalive_idle=60, max_connections_per_client=2,
                                   metrics_listen="127.0.0.1:0"))
    try:
        port = runner.addresses[0][1]
        metrics = runner.app[METRICS]
        assert metrics is not None and metrics.url is not None
        late = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in late:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a third: over the cap
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 429")
        writer.close()
        for reader, writer in late:
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 408")
            writer.close()
        samples = await scrape(metrics.url)
        assert value(samples, "relay_connection_deadlines_missed_total", deadline="header") == 2
        assert value(samples, "relay_connections_refused_total", limit="per_client") == 1
    finally:
        await runner.cleanup()


async def test_log_format_json_writes_one_object_per_line_with_no_key_token_or_prompt(
        tmp_path: Any, upstream: FakeUpstream, notify: Any) -> None:
    from conftest import TEST_KEY
    from procs import port_of, spawn_relay

    token = "tok-json-logs-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    prompt = "a prompt that must never reach a log line"
    async with spawn_relay(tmp_path, upstream, "--log-format", "json", "--tokens-file", str(tmp_path / "tokens"),
                           notify=notify) as relay:
        port = port_of(await notify.until("READY"))
        async with aiohttp.ClientSession() as session:
            auth = {"Authorization": f"Bearer {token}"}
            resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": prompt}, headers=auth)
            assert (await SSEClient(resp).all())[-1]["type"] == "done"
            wrong = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": prompt},
                                       headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status == 401
        relay.proc.send_signal(2)
        assert await relay.exit_status() == 0
    lines = [json.loads(line) for line in relay.output().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    (done,) = [line for line in lines if line.get("outcome") == "done"]
    assert done["endpoint"] == "chat" and done["model"] == "fake-model" and done["upstream"] == "upstream"
    assert done["client"] == "127.0.0.1" and done["status"] == 200 and done["tokens"] == {"prompt": 3,
                                                                                           "completion": 4}
    assert done["ttft_ms"] >= 0 and done["duration_ms"] >= done["ttft_ms"] and done["bytes"] > 0
    text = relay.output()
    for secret in (TEST_KEY, token, prompt, "not-the-token"):
        assert secret not in text


async def test_refusals_are_counted_by_reason(make_relay: Any, upstream: FakeUpstream, tmp_path: Any) -> None:
    token = "tok-metrics-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    upstream.behaviour = held("one", [])
    relay = await make_relay(metrics_listen="127.0.0.1:0", tokens_file=tmp_path / "tokens", max_streams=1)
    auth = {"Authorization": f"Bearer {token}"}
    assert (await relay.post("/chat", json={"prompt": "hi"})).status == 401
    assert (await relay.post("/chat", json={"prompt": "hi"}, headers={**auth, "Host": "evil.example"})).status == 421
    assert (await relay.post("/chat", json={"prompt": "hi"},
                             headers={**auth, "Origin": "https://evil.example"})).status == 403
    first = await relay.post("/chat", json={"prompt": "hi"}, headers=auth)
    assert first.status == 200
    assert (await relay.post("/chat", json={"prompt": "hi"}, headers=auth)).status == 503  # --max-streams 1
    first.close()
    samples = await scrape(url_of(relay))
    refused = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
               if name == "relay_requests_refused_total"}
    assert refused == {"auth": 1, "host": 1, "origin": 1, "stream_limit": 1}

    limited = await make_relay(metrics_listen="127.0.0.1:0", rate_limit=1)
    statuses = []
    for _ in range(20):  # bounded: until the bucket is empty
        resp = await limited.get("/v1/models")
        statuses.append(resp.status)
        if resp.status == 429:
            break
    assert statuses[-1] == 429
    assert value(await scrape(url_of(limited)), "relay_requests_refused_total", reason="rate_limit") == 1
