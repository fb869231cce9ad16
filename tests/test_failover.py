"""Several upstreams (relay/upstream/pool.py): routing by model, failover before the first byte,
cooldowns.  Every upstream is a real fake server; time is an injected clock, never a sleep."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import FakeUpstream, SSEClient, chunk, sse, text_of, tokens
from relay.config import Config, ConfigError
from relay.http.app import make_app
from relay.upstream.config import UpstreamSpec, parse_upstreams

KEYS = {"a": "sk-key-of-a-0000", "b": "sk-key-of-b-1111", "c": "sk-key-of-c-2222"}
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fakes(aiohttp_server: Any) -> dict[str, FakeUpstream]:
    out = {}
    for name in KEYS:
        fake = FakeUpstream()
        server = await aiohttp_server(fake.app())
        fake.server = server
        fake.base_url = str(server.make_url("/v1"))
        out[name] = fake
    return out


def closed_port_url() -> str:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def spec(name: str, url: str, **kw: Any) -> UpstreamSpec:
    kw.setdefault("models", (("m", "m"),))
    return UpstreamSpec(name=name, url=url, api_key=KEYS.get(name), **kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def start(aiohttp_client: Any, clock: Clock) -> Any:
    async def run(*specs: UpstreamSpec, **settings: Any) -> Any:
        config = Config(upstreams=specs, model=settings.pop("model", "m"), rate_limit=0,
                        max_streams_per_client=1_000_000, **settings)
        return await aiohttp_client(make_app(config, clock=clock, rng=random.Random(7)))
    return run


async def chat(relay: Any, **body: Any) -> list[dict[str, Any]]:
    return await SSEClient(await relay.post("/chat", json={"prompt": "hi", **body})).all()


def status(code: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response(body or {"error": {"message": f"fake {code}", "type": "x", "code": str(code)}},
                                 status=code, headers=headers)
    return run


async def test_first_refuses_its_connection_and_the_second_answers_one_clean_stream(
        start: Any, fakes: dict[str, FakeUpstream], caplog: pytest.LogCaptureFixture) -> None:
    relay = await start(spec("a", closed_port_url()), spec("b", fakes["b"].base_url, priority=1))
    with caplog.at_level(logging.INFO, logger="relay.generation"):
        events = await chat(relay)
    assert [e["type"] for e in events] == ["start", "delta", "delta", "delta", "delta", "done"]
    assert text_of(events) == "Hello, world!" and fakes["b"].calls == 1
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("chat "))
    assert "upstream=b tried=a:upstream_error" in line


async def test_v1_sdk_sees_failover_as_one_normal_stream(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    fakes["a"].behaviour = status(503)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="x", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, stream=True)
        assert raw.headers["x-relay-attempts"] == "2"
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text == "Hello, world!" and fakes["a"].calls == 1 and fakes["b"].calls == 1


async def test_429_with_retry_after_skips_that_upstream_until_then(start: Any, fakes: dict[str, FakeUpstream],
                                                                  clock: Clock) -> None:
    fakes["a"].behaviour = status(429, headers={"Retry-After": "30"})
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    assert text_of(await chat(relay)) == "Hello, world!"
    assert (fakes["a"].calls, fakes["b"].calls) == (1, 1)
    state = {u["name"]: u for u in (await (await relay.get("/v1/upstreams")).json())["upstreams"]}
    assert state["a"]["state"] == "cooling" and state["a"]["retry_in"] == 30 and state["a"]["why"] == "HTTP 429"
    clock.now += 29.9
    await chat(relay)
    assert (fakes["a"].calls, fakes["b"].calls) == (1, 2)  # still cooling: straight to b
    clock.now += 0.2
    fakes["a"].behaviour = None  # a is well again
    assert text_of(await chat(relay)) == "Hello, world!"
    assert (fakes["a"].calls, fakes["b"].calls) == (2, 2)  # half-open: this request tried a, and it answered
    state = {u["name"]: u for u in (await (await relay.get("/v1/upstreams")).json())["upstreams"]}
    assert state["a"]["state"] == "ok"


async def test_cooldown_without_retry_after_grows_with_failures_in_a_row(start: Any, fakes: dict[str, FakeUpstream],
                                                                        clock: Clock) -> None:
    fakes["a"].behaviour = status(500)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1),
                        cooldown=2.0, cooldown_max=5.0)
    waits = []
    for _ in range(3):
        await chat(relay)
        state = {u["name"]: u for u in (await (await relay.get("/v1/upstreams")).json())["upstreams"]}
        waits.append(state["a"]["retry_in"])
        clock.now += waits[-1]  # its cooldown is over: the next request tries it again
    assert waits == [2.0, 4.0, 5.0] and fakes["a"].calls == 3


async def test_half_open_lets_one_request_try_while_the_others_go_elsewhere(
        start: Any, fakes: dict[str, FakeUpstream], clock: Clock) -> None:
    fakes["a"].behaviour = status(500)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    await chat(relay)
    clock.now += 10
    reached = asyncio.Event()

    async def slow_to_answer(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        reached.set()
        await fake.release.wait()  # the probe's answer is not in yet: a's state is still open
        return await tokens(["probe"])(request, fake)
    fakes["a"].behaviour = slow_to_answer
    probe = asyncio.ensure_future(chat(relay))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        assert text_of(await chat(relay)) == "Hello, world!"  # meanwhile another request: b
        assert fakes["a"].calls == 2 and fakes["b"].calls == 2
    finally:
        fakes["a"].release.set()
    assert text_of(await probe) == "probe"


async def test_failure_after_the_first_delta_is_an_error_and_no_second_upstream(
        start: Any, fakes: dict[str, FakeUpstream]) -> None:
    async def cut(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("part", role="assistant")))
        return resp  # ends without finish_reason or [DONE]
    fakes["a"].behaviour = cut
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    events = await chat(relay)
    assert text_of(events) == "part" and events[-1]["type"] == "error" and events[-1]["code"] == "upstream_ended"
    assert "attempts" not in events[-1] and fakes["b"].calls == 0


async def test_first_token_timeout_before_anything_is_relayed_fails_over_on_chat_but_not_once_v1_relayed(
        start: Any, fakes: dict[str, FakeUpstream], clock: Clock) -> None:
    async def role_then_silence(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))  # not a delta: /chat shows nothing of it
        await fake.release.wait()
        return resp
    fakes["a"].behaviour = role_then_silence
    relay = await start(spec("a", fakes["a"].base_url, first_token_timeout=0.2),
                        spec("b", fakes["b"].base_url, priority=1))
    events = await chat(relay)
    assert text_of(events) == "Hello, world!" and fakes["b"].calls == 1
    clock.now += 60  # a's cooldown is over
    # /v1 passes the role chunk on at once: from there the answer is a's, and a's timeout is the end.
    try:
        resp = await relay.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
        data = await SSEClient(resp).all_data()
        assert json.loads(data[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert json.loads(data[-1])["error"]["code"] == "upstream_timeout" and fakes["b"].calls == 1
    finally:
        fakes["a"].release.set()


async def test_400_from_the_first_goes_to_the_client_and_the_second_is_never_called(
        start: Any, fakes: dict[str, FakeUpstream]) -> None:
    body = {"error": {"message": "bad messages", "type": "invalid_request_error", "param": "messages", "code": None}}
    fakes["a"].behaviour = status(400, body)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    resp = await relay.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
    assert resp.status == 400 and await resp.json() == body and resp.headers["x-relay-attempts"] == "1"
    assert fakes["b"].calls == 0
    state = {u["name"]: u for u in (await (await relay.get("/v1/upstreams")).json())["upstreams"]}
    assert state["a"]["state"] == "ok"  # the request was at fault, not the upstream


async def test_all_down_is_one_clear_error_with_the_last_answer(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    fakes["a"].behaviour = status(503)
    fakes["b"].behaviour = status(429, headers={"Retry-After": "9"})
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1))
    resp = await relay.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
    assert resp.status == 429 and resp.headers["x-relay-attempts"] == "2" and resp.headers["retry-after"] == "9"
    assert (await resp.json())["error"]["message"] == "fake 429"
    events = await chat(relay)  # both cooling: the one that recovers first is tried anyway
    assert events[-1]["type"] == "error" and events[-1]["status"] in (429, 503)
    text = json.dumps(events) + await resp.text()
    assert not any(key in text for key in KEYS.values()) and "127.0.0.1" not in text


async def test_at_most_max_attempts_upstreams(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    for name in "abc":
        fakes[name].behaviour = status(502)
    relay = await start(*(spec(n, fakes[n].base_url, priority=i) for i, n in enumerate("abc")), max_attempts=2)
    events = await chat(relay)
    assert events[-1]["attempts"] == 2 and [fakes[n].calls for n in "abc"] == [1, 1, 0]


async def test_401_fails_over_and_marks_the_upstream_down_for_longer(start: Any, fakes: dict[str, FakeUpstream],
                                                                    clock: Clock) -> None:
    fakes["a"].behaviour = status(401)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1),
                        down_time=900)
    assert text_of(await chat(relay)) == "Hello, world!"
    state = {u["name"]: u for u in (await (await relay.get("/v1/upstreams")).json())["upstreams"]}
    assert state["a"]["state"] == "down" and state["a"]["retry_in"] == 900 and "credentials" in state["a"]["why"]
    clock.now += 899
    await chat(relay)
    assert fakes["a"].calls == 1


async def test_each_upstream_gets_only_its_own_key_azure_style_beside_openai_style(
        start: Any, fakes: dict[str, FakeUpstream]) -> None:
    fakes["a"].behaviour = status(500)
    relay = await start(
        spec("a", fakes["a"].base_url, api_key_header="api-key", query=(("api-version", "2024-10-21"),),
             headers=(("X-Team", "blue"),)),
        spec("b", fakes["b"].base_url, priority=1))
    await chat(relay)
    a, b = fakes["a"].headers[0], fakes["b"].headers[0]
    assert a["api-key"] == KEYS["a"] and "Authorization" not in a and a["X-Team"] == "blue"
    assert b["Authorization"] == f"Bearer {KEYS['b']}" and "api-key" not in b and "X-Team" not in b
    assert KEYS["b"] not in json.dumps(a) and KEYS["a"] not in json.dumps(b)


async def test_an_alias_sends_the_upstream_its_own_name_and_v1_chunks_pass_as_sent(
        start: Any, fakes: dict[str, FakeUpstream]) -> None:
    relay = await start(spec("a", fakes["a"].base_url, models=(("gpt-4o", "my-deployment"),)), model="gpt-4o")
    resp = await relay.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    data = await SSEClient(resp).all_data()
    assert fakes["a"].requests[0]["model"] == "my-deployment"
    assert json.loads(data[0])["model"] == "fake-model"  # the upstream's chunk, untouched
    resp = await relay.post("/chat", json={"prompt": "hi", "model": "other"})
    assert resp.status == 400 and "gpt-4o" in (await resp.json())["error"]["message"]


async def test_routing_by_model_priority_and_weight(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    relay = await start(spec("a", fakes["a"].base_url, models=(("x", "x"), ("m", "m")), weight=1),
                        spec("b", fakes["b"].base_url, models=(("m", "m"),), weight=3),
                        spec("c", fakes["c"].base_url, models=(("m", "m"), ("y", "y")), priority=1))
    for _ in range(40):
        await chat(relay, model="m")
    assert fakes["c"].calls == 0 and 0 < fakes["a"].calls < fakes["b"].calls  # shared 1:3, c only as a fallback
    await chat(relay, model="y")
    assert fakes["c"].calls == 1
    models = [m["id"] for m in (await (await relay.get("/v1/models")).json())["data"]]
    assert models == ["m", "x", "y"]  # every client-visible model once, the default first


async def test_redirects_are_not_followed(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    async def redirect(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(fakes["c"].base_url + "/chat/completions")
    fakes["a"].behaviour = redirect
    relay = await start(spec("a", fakes["a"].base_url, api_key_header="api-key"),
                        spec("b", fakes["b"].base_url, priority=1))
    assert text_of(await chat(relay)) == "Hello, world!"
    assert fakes["c"].calls == 0  # a's key never went where a pointed


async def test_upstreams_state_needs_the_access_token(aiohttp_client: Any, fakes: dict[str, FakeUpstream],
                                                      tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("tok-0123456789abcdef0123\n")
    config = Config(upstreams=(spec("a", fakes["a"].base_url),), model="m", tokens_file=tokens_file)
    relay = await aiohttp_client(make_app(config))
    assert (await relay.get("/v1/upstreams")).status == 401
    resp = await relay.get("/v1/upstreams", headers={"Authorization": "Bearer tok-0123456789abcdef0123"})
    body = await resp.json()
    assert resp.status == 200 and body["upstreams"][0]["name"] == "a"
    assert fakes["a"].base_url not in json.dumps(body) and KEYS["a"] not in json.dumps(body)
    ready = await (await relay.get("/readyz")).json()
    assert "a" not in ready["reason"].split()  # the public summary names no upstream


async def test_readyz_is_ready_when_any_upstream_is(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    fakes["a"].models_status = 500
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url))
    resp = await relay.get("/readyz")
    assert resp.status == 200 and (await resp.json())["reason"] == "1 of 2 upstreams are reachable"


async def test_usage_is_counted_per_upstream(start: Any, fakes: dict[str, FakeUpstream]) -> None:
    fakes["b"].behaviour = tokens(["one", "two"])
    relay = await start(spec("b", fakes["b"].base_url))
    await chat(relay)
    state = (await (await relay.get("/v1/upstreams")).json())["upstreams"][0]
    assert (state["requests"], state["prompt_tokens"], state["completion_tokens"]) == (1, 3, 2)


# -- configuration ----------------------------------------------------------------------------

ENV = {"A_KEY": "sk-a"}


@pytest.mark.parametrize("entries,words", [
    ([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"], "colour": "red"}], "unknown key 'colour'"),
    ([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"]},
      {"name": "a", "url": "http://127.0.0.1:2/v1", "models": ["m"]}], "used by another entry"),
    ([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"], "key_env": "NOPE"}], "NOPE"),
    ([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"], "key_file": "/nonexistent/key"}],
     "cannot be read"),
    ([{"name": "a", "url": "ftp://x", "models": ["m"]}], "url must be an http"),
    ([{"name": "a", "url": "http://127.0.0.1:1/v1"}], "models is required"),
    ([{"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["m"], "weight": 0}], "weight"),
])
def test_bad_entries_are_refused_naming_the_entry(entries: list[dict[str, Any]], words: str) -> None:
    with pytest.raises(ConfigError, match="entry") as info:
        parse_upstreams(entries, ENV)
    assert words in str(info.value)


def test_entry_forms(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    a, b = parse_upstreams([
        {"name": "a", "url": "https://x.example/v1/", "models": {"gpt-4o": "dep"}, "key_env": "A_KEY",
         "query": {"api-version": "1"}, "headers": ["X-A: 1"], "api_key_header": "api-key", "priority": 2,
         "first_token_timeout": 5},
        {"name": "b", "url": "https://y.example/v1", "models": "*", "key_file": str(key),
         "query": ["k=v"], "headers": {"X-B": "2"}},
    ], ENV)
    assert (a.api_key, a.url, a.models, a.query, a.headers, a.priority, a.first_token_timeout) == (
        "sk-a", "https://x.example/v1", (("gpt-4o", "dep"),), (("api-version", "1"),), (("X-A", "1"),), 2, 5.0)
    assert (b.api_key, b.any_model, b.query, b.headers) == ("sk-file", True, (("k", "v"),), (("X-B", "2"),))
    assert "sk-a" not in repr(a)


def test_default_model_served_by_nobody_is_refused() -> None:
    with pytest.raises(ConfigError, match="served by no"):
        Config(upstreams=(UpstreamSpec(name="a", url="http://127.0.0.1:1/v1", models=(("m", "m"),)),), model="z")


def test_upstreams_with_the_upstream_flag_is_exit_2_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:9/v1"\nmodels = ["m"]\n')
    script = Path(sys.executable).parent / "relay"
    done = subprocess.run([str(script), "serve", "--config", str(path), "--upstream", "http://127.0.0.1:8/v1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "[[upstreams]]" in done.stderr
    path.write_text('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:9/v1"\nmodels = ["m"]\nkey_env = "NO_SUCH"\n')
    done = subprocess.run([str(script), "serve", "--config", str(path)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "NO_SUCH" in done.stderr and "entry 1 ('a')" in done.stderr


async def test_every_configured_key_is_blanked_in_what_any_upstream_sends(start: Any,
                                                                         fakes: dict[str, FakeUpstream]) -> None:
    # b (a shared proxy, say) quotes a's key: a's key is blanked in b's answer too.
    fakes["b"].behaviour = status(400, {"error": {"message": f"key {KEYS['a']} is not mine", "type": "x"}})
    relay = await start(spec("b", fakes["b"].base_url), spec("a", fakes["a"].base_url, priority=1))
    resp = await relay.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
    assert resp.status == 400 and (await resp.json())["error"]["message"] == "key [redacted] is not mine"


async def test_each_upstreams_state_and_failovers_are_in_the_metrics(
        start: Any, fakes: dict[str, FakeUpstream], clock: Clock) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from test_metrics import scrape, value

    from relay.http.appkeys import METRICS

    fakes["a"].behaviour = status(503)
    relay = await start(spec("a", fakes["a"].base_url), spec("b", fakes["b"].base_url, priority=1),
                        metrics_listen="127.0.0.1:0")
    metrics = relay.app[METRICS]
    assert metrics is not None and metrics.url is not None
    before = await scrape(metrics.url)
    assert value(before, "relay_upstream_available", upstream="a") == 1  # sampled from the start
    assert text_of(await chat(relay)) == "Hello, world!"
    async with asyncio.timeout(10):  # the sampler's next second sees a cooling down
        while value(samples := await scrape(metrics.url), "relay_upstream_available", upstream="a") != 0:
            await asyncio.sleep(0.05)
    assert value(samples, "relay_upstream_available", upstream="b") == 1
    assert value(samples, "relay_upstream_failovers_total", upstream="a") == 1
    assert value(samples, "relay_upstream_failovers_total", upstream="b") == 0
    assert value(samples, "relay_upstream_requests_total", upstream="a", status="503") == 1
    assert value(samples, "relay_upstream_requests_total", upstream="b", status="200") == 1
    assert value(samples, "relay_generations_finished_total", endpoint="chat", model="m", upstream="b",
                 outcome="done") == 1
    clock.now += 3600  # its cooldown is over: available again
    async with asyncio.timeout(10):
        while value(await scrape(metrics.url), "relay_upstream_available", upstream="a") != 1:
            await asyncio.sleep(0.05)
