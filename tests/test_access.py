"""Access done right: what tokens, origins, hosts and limits let through, and how."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import TEST_KEY, FakeUpstream, RelayFactory, SSEClient, paused, text_of
from relay.http.access import Access
from relay.http.appkeys import ACCESS
from relay.config import Config, ConfigError
from relay.http.ratelimit import RateLimiter, StreamSlots, TooManyStreams

TOKEN = "tok-main-" + "m" * 24
OTHER = "tok-other-" + "o" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# clients\n{TOKEN}\n\n   {OTHER}   \n")
    return path


@pytest.fixture
async def guarded(make_relay: RelayFactory, tokens_file: Path) -> Any:
    return await make_relay(tokens_file=tokens_file)


# -- tokens and the EventSource scheme -----------------------------------------------------------

async def test_eventsource_reads_its_stream_through_the_signed_events_url_without_the_token(guarded: Any) -> None:
    resp = await guarded.post("/chat", json={"prompt": "hi"}, headers={**AUTH, "Accept": "application/json"})
    assert resp.status == 201
    body = await resp.json()
    events_url = body["events"]
    assert events_url.startswith(f"/chat/{body['id']}?exp=") and "&sig=" in events_url
    assert TOKEN not in events_url
    # What EventSource does: a GET with no Authorization header.
    stream = await guarded.get(events_url)
    assert stream.status == 200
    assert text_of(await SSEClient(stream).all()) == "Hello, world!"


async def test_the_events_url_also_stops_its_stream(guarded: Any, upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("", "ok")
    resp = await guarded.post("/chat", json={"prompt": "hi"}, headers={**AUTH, "Accept": "application/json"})
    events_url = (await resp.json())["events"]
    assert (await guarded.delete(events_url)).status == 204
    upstream.release.set()


async def test_revoking_a_token_closes_its_events_urls(guarded: Any, tokens_file: Path, upstream: FakeUpstream) -> None:
    upstream.behaviour = paused("", "ok")
    resp = await guarded.post("/chat", json={"prompt": "hi"}, headers={**AUTH, "Accept": "application/json"})
    events_url = (await resp.json())["events"]
    tokens_file.write_text(OTHER + "\n")
    assert guarded.app[ACCESS].reload()
    refused = await guarded.get(events_url)
    assert refused.status == 401
    assert "revoked" in (await refused.json())["error"]["message"]
    upstream.release.set()


async def test_clients_that_can_send_headers_use_every_route_with_the_token(guarded: Any) -> None:
    resp = await guarded.get("/chat", params={"prompt": "hi"}, headers=AUTH)
    assert resp.status == 200
    events = await SSEClient(resp).all()
    assert text_of(events) == "Hello, world!"
    stream_id = events[0]["id"]
    assert (await guarded.get(f"/chat/{stream_id}", headers={**AUTH, "Last-Event-ID": f"{stream_id}.end"})).status == 204
    assert (await guarded.delete(f"/chat/{stream_id}", headers=AUTH)).status == 204


async def test_health_and_readiness_stay_open_to_anyone_under_any_name(guarded: Any) -> None:
    for path in ("/healthz", "/readyz"):
        resp = await guarded.get(path, headers={"Host": "10.0.0.7:8080", "Origin": "https://elsewhere.example"})
        assert resp.status == 200
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_openai_sdk_raises_authentication_error_and_works_with_the_token(guarded: Any) -> None:
    base = str(guarded.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong-token-" + "w" * 20, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    async with openai.AsyncOpenAI(base_url=base, api_key=TOKEN, max_retries=0) as good:
        answer = await good.chat.completions.create(model="fake-model", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}])
        text = "".join([c.choices[0].delta.content or "" async for c in answer if c.choices])
    assert text == "Hello, world!"


async def test_openai_sdk_raises_rate_limit_error_over_the_limit(make_relay: RelayFactory) -> None:
    relay = await make_relay(rate_limit=1)
    async with openai.AsyncOpenAI(base_url=str(relay.make_url("/v1")), api_key="x", max_retries=0) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError):
            await client.models.list()


def test_reload_that_cannot_read_the_file_keeps_the_tokens_and_says_why(
        tokens_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    access = Access(Config(tokens_file=tokens_file))
    owner = access.owner_of(TOKEN)
    assert owner is not None
    tokens_file.unlink()
    with caplog.at_level(logging.ERROR, logger="relay.access"):
        assert not access.reload()
    assert access.owner_of(TOKEN) == owner
    assert "tokens not reloaded" in caplog.text and "cannot read the tokens file" in caplog.text


def test_a_bad_token_line_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("short-secret\n")
    with pytest.raises(ConfigError, match="line 1 of the tokens file") as info:
        Access(Config(tokens_file=path))
    assert "short-secret" not in str(info.value)


# -- browsers: origins, hosts ---------------------------------------------------------------------

async def test_the_pages_own_origin_is_allowed(relay: Any) -> None:
    origin = f"http://127.0.0.1:{relay.port}"
    resp = await relay.post("/chat", json={"prompt": "hi"}, headers={"Origin": origin})
    assert resp.status == 200
    assert text_of(await SSEClient(resp).all()) == "Hello, world!"


async def test_preflight_is_answered_for_an_allowed_origin_and_responses_carry_cors(make_relay: RelayFactory) -> None:
    relay = await make_relay(allow_origins=("https://app.example",))
    preflight = await relay.options("/chat", headers={"Origin": "https://app.example",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
    assert preflight.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type, Last-Event-ID"
    resp = await relay.post("/chat", json={"prompt": "hi"}, headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert resp.headers["Access-Control-Expose-Headers"] == "Location"
    assert text_of(await SSEClient(resp).all()) == "Hello, world!"


async def test_behind_a_trusted_tls_proxy_the_https_page_is_its_own_origin(make_relay: RelayFactory) -> None:
    relay = await make_relay(allow_hosts=("relay.example.com",), trust_proxy=("127.0.0.1",))
    headers = {"Host": "relay.example.com", "Origin": "https://relay.example.com", "X-Forwarded-Proto": "https"}
    resp = await relay.post("/chat", json={"prompt": "hi"}, headers=headers)
    assert resp.status == 200
    assert text_of(await SSEClient(resp).all()) == "Hello, world!"
    downgraded = await relay.post("/chat", json={"prompt": "hi"},
                                  headers={**headers, "Origin": "http://relay.example.com"})
    assert downgraded.status == 403


@pytest.mark.parametrize(("allowed", "host", "status"), [
    pytest.param((), "localhost:8080", 200, id="localhost-any-port"),
    pytest.param((), "[::1]:8080", 200, id="ipv6-loopback"),
    pytest.param(("relay.example.com",), "relay.example.com", 200, id="named-host"),
    pytest.param(("relay.example.com",), "RELAY.example.com:443", 200, id="named-host-any-port-any-case"),
    pytest.param(("relay.example.com:8443",), "relay.example.com:9999", 421, id="host-with-port-only-that-port"),
    pytest.param(("*",), "anything.example", 200, id="wildcard"),
])
async def test_host_allowlist(make_relay: RelayFactory, allowed: tuple[str, ...], host: str, status: int) -> None:
    relay = await make_relay(allow_hosts=allowed)
    assert (await relay.get("/v1/models", headers={"Host": host})).status == status


# -- limits ---------------------------------------------------------------------------------------

async def test_forwarded_for_counts_only_from_a_trusted_proxy(make_relay: RelayFactory) -> None:
    untrusted = await make_relay(rate_limit=1)
    assert (await untrusted.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})).status == 200
    assert (await untrusted.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.2"})).status == 429

    trusted = await make_relay(rate_limit=1, trust_proxy=("127.0.0.0/8",))
    assert (await trusted.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})).status == 200
    assert (await trusted.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})).status == 429
    # A client cannot pick its identity by prepending: the hop the proxy appended counts.
    spoofed = {"X-Forwarded-For": "203.0.113.9, 198.51.100.1"}
    assert (await trusted.get("/v1/models", headers=spoofed)).status == 429
    assert (await trusted.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.2"})).status == 200


async def test_a_finished_stream_gives_its_slot_back(make_relay: RelayFactory) -> None:
    relay = await make_relay(max_streams_per_client=1)
    for _ in range(3):
        resp = await relay.post("/chat", json={"prompt": "hi"})
        assert text_of(await SSEClient(resp).all()) == "Hello, world!"


async def test_streams_per_client_on_v1_answers_429_in_openai_shape(make_relay: RelayFactory,
                                                                    upstream: FakeUpstream) -> None:
    relay = await make_relay(max_streams_per_client=1)
    upstream.behaviour = paused("", "ok")
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    first = await relay.post("/v1/chat/completions", json=body)
    assert first.status == 200
    second = await relay.post("/v1/chat/completions", json=body)
    assert second.status == 429 and second.headers["Retry-After"] == "5"
    assert (await second.json())["error"]["code"] == "rate_limit_exceeded"
    upstream.release.set()
    await first.read()


async def test_a_ceiling_on_output_tokens_admits_what_is_below_it(make_relay: RelayFactory,
                                                                  upstream: FakeUpstream) -> None:
    relay = await make_relay(max_output_tokens=100)
    resp = await relay.post("/chat", json={"prompt": "hi", "max_tokens": 100})
    assert text_of(await SSEClient(resp).all()) == "Hello, world!"
    assert upstream.requests[0]["max_tokens"] == 100


def test_rate_limiter_refills_and_forgets_idle_clients_first() -> None:
    now = [0.0]
    limiter = RateLimiter(60, max_clients=2, clock=lambda: now[0])
    assert all(limiter.take("a") == 0 for _ in range(60))
    assert limiter.take("a") == pytest.approx(1.0)  # one request per second comes back
    now[0] += 1.0
    assert limiter.take("a") == 0
    limiter.take("b")
    limiter.take("c")  # over max_clients: "a", idle longest, is forgotten
    assert len(limiter) == 2
    assert limiter.take("a") == 0


def test_stream_slots_release_once() -> None:
    slots = StreamSlots(1)
    release = slots.acquire("x")
    with pytest.raises(TooManyStreams):
        slots.acquire("x")
    release()
    release()
    assert slots.running("x") == 0
    slots.acquire("x")


# -- what reaches the upstream --------------------------------------------------------------------

async def test_nothing_a_client_sends_changes_where_the_relay_connects_or_what_it_sends(
        guarded: Any, upstream: FakeUpstream) -> None:
    hostile = {**AUTH, "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "10.6.6.6", "Cookie": "s=1",
               "X-Api-Key": "client-key", "Api-Key": "client-key", "OpenAI-Organization": "org-evil",
               "X-Original-URL": "/admin", "Forwarded": "host=evil.example"}
    for path, body in (("/chat", {"prompt": "hi", "model": "fake-model"}),
                       ("/v1/chat/completions", {"model": "fake-model", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})):
        resp = await guarded.post(path, json=body, headers=hostile)
        assert resp.status == 200
        await resp.read()
    assert upstream.calls == 2
    for seen in upstream.headers:
        assert seen["Authorization"] == f"Bearer {TEST_KEY}"
        assert seen["Host"] == f"{upstream.server.host}:{upstream.server.port}"
        assert TOKEN not in str(seen)
        lowered = {k.lower() for k in seen}
        assert not lowered & {"x-forwarded-host", "x-forwarded-for", "cookie", "x-api-key", "api-key",
                              "openai-organization", "x-original-url", "forwarded"}


async def test_crlf_in_stop_travels_as_json_and_cannot_split_an_event(relay: Any, upstream: FakeUpstream) -> None:
    stop = "\r\n\r\ndata: forged\r\n"
    resp = await relay.post("/chat", json={"prompt": "hi", "stop": [stop]})
    events = await SSEClient(resp).all()
    assert [e["type"] for e in events] == ["start", *["delta"] * 4, "done"]
    assert upstream.requests[0]["stop"] == [stop]


# -- static files ---------------------------------------------------------------------------------

async def test_page_files_are_served_with_their_types_and_nosniff_everywhere(make_relay: RelayFactory,
                                                                             tmp_path: Path) -> None:
    for name, text in (("index.html", "<!doctype html>"), ("app.js", "1"), ("style.css", "a{}"),
                       ("icon.svg", "<svg/>"), ("data.bin", "x")):
        (tmp_path / name).write_text(text)
    relay = await make_relay(web_root=tmp_path)
    expected = {"/": "text/html", "/static/app.js": "text/javascript", "/static/style.css": "text/css",
                "/static/icon.svg": "image/svg+xml", "/static/data.bin": "application/octet-stream"}
    for path, content_type in expected.items():
        resp = await relay.get(path)
        assert resp.status == 200 and resp.content_type == content_type, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for method, path in (("GET", "/nope"), ("PUT", "/chat"), ("POST", "/chat")):
        resp = await relay.request(method, path)
        assert resp.headers["X-Content-Type-Options"] == "nosniff", (method, path)


async def test_a_tokens_file_may_hold_digests_instead_of_tokens(make_relay: RelayFactory, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    relay = await make_relay(tokens_file=path)
    assert (await relay.get("/v1/models", headers=AUTH)).status == 200
    assert (await relay.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})).status == 401
    path.write_text("sha256:abc\n")
    with pytest.raises(ConfigError, match="64 hex digits"):
        Access(Config(tokens_file=path))


# -- settings -------------------------------------------------------------------------------------

def test_access_settings_come_from_flags_environment_and_the_config_file(tmp_path: Path, tokens_file: Path) -> None:
    from relay.run.cli import config_from_args
    from relay.run.flags import build_parser

    def config(argv: list[str], environ: dict[str, str]) -> Config:
        return config_from_args(build_parser().parse_args(["serve", *argv]), environ)

    flags = config(["--allow-host", "a.example", "--allow-host", "b.example", "--allow-origin", "https://a.example",
                    "--trust-proxy", "10.0.0.0/8", "--rate-limit", "5", "--max-output-tokens", "99",
                    "--tokens-file", str(tokens_file), "--host", "0.0.0.0"], {})
    assert flags.allow_hosts == ("a.example", "b.example") and flags.allow_origins == ("https://a.example",)
    assert (flags.trust_proxy, flags.rate_limit, flags.max_output_tokens) == (("10.0.0.0/8",), 5, 99)
    env = config([], {"RELAY_ALLOW_HOSTS": "x.example, y.example", "RELAY_TRUST_PROXY": "127.0.0.1",
                      "RELAY_TOKENS_FILE": str(tokens_file), "RELAY_RATE_LIMIT": "0"})
    assert env.allow_hosts == ("x.example", "y.example") and env.tokens_file == tokens_file and env.rate_limit == 0
    toml = tmp_path / "relay.toml"
    toml.write_text(f'allow-origins = ["https://c.example"]\ntokens-file = "{tokens_file}"\n'
                    'host = "0.0.0.0"\nmax-streams-per-client = 2\n')
    from_file = config(["--config", str(toml)], {})
    assert from_file.allow_origins == ("https://c.example",) and from_file.max_streams_per_client == 2
    assert config(["--host", "::", "--allow-anonymous"], {}).allow_anonymous


@pytest.mark.parametrize(("settings", "words"), [
    pytest.param({"allow_origins": ("https://a.example/path",)}, "must be an origin", id="origin-with-path"),
    pytest.param({"allow_origins": ("*",)}, "must be an origin", id="origin-wildcard"),
    pytest.param({"trust_proxy": ("not-an-ip",)}, "not an IP address or CIDR", id="bad-proxy"),
    pytest.param({"allow_hosts": ("a b",)}, "must be a host name", id="bad-host"),
    pytest.param({"rate_limit": -1}, "--rate-limit", id="negative-rate"),
    pytest.param({"max_streams_per_client": 0}, "--max-streams-per-client must be at least 1", id="zero-streams"),
    pytest.param({"host": "192.0.2.1"}, "refusing to listen on 192.0.2.1 without access control", id="open-host"),
])
def test_bad_access_settings_are_refused_with_a_reason(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        Config(**settings)
