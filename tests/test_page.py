"""The chat page in a real browser: Playwright (async) driving Debian's Chromium against the relay.

The relay and the fake upstream are real servers on loopback; the page is loaded from the
relay (or through ``CuttableProxy``, a TCP proxy the test can cut mid-answer).  Every test
collects console errors, page errors and CSP violations and fails on any it did not provoke.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, RelayFactory, chunk, require, sse, tokens, wait_for
from relay.http.appkeys import REGISTRY
from relay.sse import SSEDecoder

try:
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright, expect
except ImportError:  # pragma: no cover - exercised only where playwright is missing
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
#: An upper bound per browser test, so a bug fails the test instead of hanging the suite.
TEST_BOUND = 60.0
#: Playwright's own waits (expect, wait_for_function) give up after this many milliseconds.
WAIT_MS = 15_000


@dataclass
class BrowserPage:
    page: Page
    context: BrowserContext
    #: console errors, uncaught page errors and CSP violations seen so far
    problems: list[str] = field(default_factory=list)

    async def open(self, url: str, transport: str | None = None) -> None:
        await self.page.goto(url)
        await expect(self.page.locator("#status")).to_have_attribute("data-state", "idle")
        if transport is not None:
            await self.page.select_option("#transport", transport)

    async def ask(self, text: str) -> None:
        await self.page.fill("#prompt", text)
        await self.page.press("#prompt", "Enter")

    def answer(self) -> Any:
        return self.page.locator(".msg.assistant").last

    async def answer_text(self) -> str:
        """The answer's Markdown source as the page holds it (what it renders; tests of the
        rendering look at the DOM itself)."""
        text: str = await self.answer().locator(".content").evaluate("el => el.dataset.source")
        return text

    async def wait_until_finished(self, state: str) -> None:
        await expect(self.answer()).to_have_attribute("data-state", state)

    async def wait_for_text(self, text: str) -> None:
        await self.page.wait_for_function(
            "t => { const m = [...document.querySelectorAll('.msg.assistant .content')].pop();"
            " return m !== undefined && m.textContent.includes(t); }", arg=text)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(async_playwright is not None, "the playwright package is missing (pip install -e '.[test]')")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def bp(browser: Browser) -> AsyncIterator[BrowserPage]:
    """A fresh context and page; at teardown, no console error or CSP violation may remain unclaimed."""
    context = await browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    result = BrowserPage(page, context)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            result.problems.append(f"console error: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: result.problems.append(f"page error: {exc}"))
    await page.expose_function("__reportCSP", lambda v: result.problems.append(f"CSP violation: {v}"))
    await context.add_init_script(
        "document.addEventListener('securitypolicyviolation', e =>"
        " window.__reportCSP(e.violatedDirective + ' ' + e.blockedURI));")
    try:
        async with asyncio.timeout(TEST_BOUND):
            yield result
        assert result.problems == [], "the page logged errors or violated its CSP"
    finally:
        await context.close()


class CuttableProxy:
    """A TCP proxy on loopback in front of the relay.

    ``cut()`` drops every connection open now and holds new ones (accepted, not forwarded)
    until ``reopen()``, so the test sees the page's "reconnecting" state for as long as it likes.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        self.connections += 1
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pair = (c_writer, u_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(c_reader, u_writer), self._pipe(u_reader, c_writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def cut(self) -> None:
        self._open.clear()
        for c_writer, u_writer in list(self._pairs):
            c_writer.transport.abort()
            u_writer.transport.abort()

    def reopen(self) -> None:
        self._open.set()

    async def close(self) -> None:
        self.cut()
        self.reopen()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def held(parts: list[str], gates: list[asyncio.Event]) -> Any:
    """An upstream that sends ``parts[i]`` after ``gates[i-1]`` is set (the first part at once), then finishes."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        for i, part in enumerate(parts):
            if i:
                await gates[i - 1].wait()
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


ANSWER = ["Sure", ", here", " is", " a", " loop", ":\n\n", "```python\n", "for i in range(3):\n",
          "    print(i, 'ü😀')\n", "```\n", "\nIt prints ", "0, 1 and 2."]


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_answer_streams_in_full_in_each_transport(transport: str, bp: BrowserPage, make_relay: RelayFactory,
                                                        upstream: FakeUpstream) -> None:
    parts = ["Hel", "lo", " wörld", " 😀", "\n\nline two  with  spaces\n", "<b>not bold</b> & done."]
    upstream.behaviour = tokens(parts)
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), transport)
    await bp.ask("say hello")
    await bp.wait_until_finished("done")
    assert await bp.answer_text() == "".join(parts)
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": "say hello"}]
    await expect(bp.page.locator("#status")).to_have_attribute("data-state", "done")
    await expect(bp.page.locator("#status")).to_contain_text("first token")
    await expect(bp.page.locator("#demo")).to_be_hidden()


async def test_conversation_sends_every_message_so_far(bp: BrowserPage, make_relay: RelayFactory,
                                                       upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["first answer"])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.page.fill("#prompt", "line one")
    await bp.page.press("#prompt", "Shift+Enter")
    await bp.page.type("#prompt", "line two")
    assert await bp.page.input_value("#prompt") == "line one\nline two"  # Shift+Enter did not send
    await bp.page.press("#prompt", "Enter")
    await bp.wait_until_finished("done")
    upstream.behaviour = tokens(["second answer"])
    await bp.ask("and again")
    await expect(bp.page.locator(".msg.assistant")).to_have_count(2)
    await bp.wait_until_finished("done")
    assert upstream.requests[1]["messages"] == [
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "and again"},
    ]
    await bp.page.click("#new-chat")
    await expect(bp.page.locator(".msg")).to_have_count(0)
    upstream.behaviour = tokens(["fresh"])
    await bp.ask("new topic")
    await bp.wait_until_finished("done")
    assert upstream.requests[2]["messages"] == [{"role": "user", "content": "new topic"}]


async def test_transport_choice_is_remembered_across_reloads(bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")))
    assert await bp.page.input_value("#transport") == "eventsource"
    await bp.page.select_option("#transport", "fetch")
    await bp.open(str(relay.make_url("/")))
    assert await bp.page.input_value("#transport") == "fetch"


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_stop_closes_the_upstream_and_keeps_the_partial_answer(
        transport: str, bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    never = asyncio.Event()
    upstream.behaviour = held(["partial ", "answer", " never sent"], [never, never])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), transport)
    await bp.ask("go")
    await bp.wait_for_text("partial ")
    await bp.page.click("#stop")
    await asyncio.wait_for(upstream.closed.wait(), timeout=10)
    await bp.wait_until_finished("stopped")
    assert await bp.answer_text() == "partial "
    await expect(bp.answer().locator(".note")).to_have_text("Stopped")
    await expect(bp.page.locator("#send")).to_be_visible()
    registry = relay.server.app[REGISTRY]
    assert registry.live == 0


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_cut_connection_resumes_without_duplicated_or_missing_text(
        transport: str, bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    parts = ["Before", " the cut;", " sent while", " cut off;", " after", " resuming."]
    gates = [asyncio.Event() for _ in parts[1:]]
    upstream.behaviour = held(parts, gates)
    relay = await make_relay(retry_ms=300)
    proxy = CuttableProxy(relay.port)
    await proxy.start()
    try:
        await bp.open(f"http://127.0.0.1:{proxy.port}/", transport)
        await bp.ask("tell me")
        await bp.wait_for_text("Before")
        gates[0].set()
        await bp.wait_for_text("Before the cut;")
        stream = relay.server.app[REGISTRY].running()[0]
        proxy.cut()
        await expect(bp.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        await wait_for(lambda: stream.subscribers == 0)
        # Sent while nobody listens: the reconnect must replay these from the relay's log.
        gates[1].set()
        gates[2].set()
        proxy.reopen()
        await wait_for(lambda: stream.subscribers == 1)
        await expect(bp.page.locator("#status")).to_contain_text("Resumed")
        # Sent live to the resumed connection.
        gates[3].set()
        gates[4].set()
        await bp.wait_until_finished("done")
        assert await bp.answer_text() == "".join(parts)
        assert upstream.calls == 1
    finally:
        await proxy.close()
    assert proxy.connections >= 2, "the page never reconnected"
    # The browser's log of the cut connection is what this test provoked.
    bp.problems[:] = [p for p in bp.problems if "net::ERR_" not in p]


async def test_upstream_error_shows_the_servers_message(bp: BrowserPage, make_relay: RelayFactory,
                                                       upstream: FakeUpstream) -> None:
    async def overloaded(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response({"error": {"message": "The model is overloaded right now", "type": "server_error"}},
                                 status=503)
    upstream.behaviour = overloaded
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "eventsource")
    await bp.ask("hi")
    await bp.wait_until_finished("error")
    await expect(bp.answer().locator(".note")).to_contain_text("The model is overloaded right now")
    await expect(bp.page.locator("#status")).to_contain_text("The model is overloaded right now")
    await expect(bp.page.locator("#status")).to_have_attribute("data-state", "error")


async def test_relay_refusal_shows_its_message(bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay(max_body=64)
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("x" * 200)
    await bp.wait_until_finished("error")
    await expect(bp.answer().locator(".note")).to_contain_text("larger than the limit of 64 bytes")
    # The browser logs the 413 it was provoked into.
    bp.problems[:] = [p for p in bp.problems if "413" not in p]


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_html_and_script_in_the_answer_are_shown_as_text_never_run(
        transport: str, bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    hostile = ['<img src=x onerror="window.__pwned=1;alert(1)">', " <script>window.__pwned=2;alert(2)</script>",
               ' <a href="javascript:alert(3)">link</a>', "\n```html\n<svg onload=alert(4)></svg>\n```\n"]
    upstream.behaviour = tokens(hostile)
    dialogs: list[str] = []
    bp.page.on("dialog", lambda d: dialogs.append(d.message))
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), transport)
    await bp.ask("be evil")
    await bp.wait_until_finished("done")
    content = bp.answer().locator(".content")
    await expect(content).to_contain_text('<img src=x onerror="window.__pwned=1;alert(1)">')
    await expect(content).to_contain_text("<script>window.__pwned=2;alert(2)</script>")
    await expect(content.locator("pre code")).to_have_text("<svg onload=alert(4)></svg>")
    assert await content.locator("img, script, a, svg").count() == 0
    assert await bp.page.evaluate("window.__pwned") is None
    assert dialogs == []


async def test_demo_model_is_announced(bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay(upstream=None, demo_token_delay=0.0)
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("hello demo")
    await bp.wait_until_finished("done")
    await expect(bp.page.locator("#demo")).to_be_visible()
    await expect(bp.answer().locator(".who")).to_contain_text("demo model")


async def test_keepalives_are_shown_while_waiting_for_the_first_token(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    first = asyncio.Event()
    upstream.behaviour = held(["", "thought about it"], [first])
    relay = await make_relay(keepalive=0.05)
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("think hard")
    await expect(bp.page.locator("#status")).to_contain_text("keepalives")
    await expect(bp.page.locator("#status")).to_have_attribute("data-state", "waiting")
    first.set()
    await bp.wait_until_finished("done")
    assert await bp.answer_text() == "thought about it"


async def test_page_and_files_carry_a_strict_content_security_policy(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    for path, ctype in [("/", "text/html"), ("/static/app.js", "text/javascript"),
                        ("/static/sse-parser.js", "text/javascript"), ("/static/style.css", "text/css"),
                        ("/favicon.ico", "image/svg+xml"), ("/static/favicon.svg", "image/svg+xml")]:
        resp = await relay.get(path)
        assert resp.status == 200, path
        assert resp.content_type in (ctype, "application/javascript"), path
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    page = await (await relay.get("/")).text()
    assert "<style" not in page and " style=" not in page and "<script>" not in page
    assert "http://" not in page and "https://" not in page  # nothing from another origin
    assert (await relay.get("/static/")).status in (403, 404)  # no directory listing


# -- the fetch-mode parser, in the browser, on byte-split input --------------------------------

PARSER_STREAM = (
    "\ufeff: hello\r\n"             # BOM, comment with CRLF
    "retry: 1500\r"                 # CR line ending
    "id: s.0\r\ndata: {\"a\":1}\r\n\r\n"
    ":keepalive\n"
    "event: other\ndata: x\n\n"
    "data:no space\ndata:  two spaces\n\n"
    "id: s.1\ndata: caf\u00e9 \U0001f600 \u4e2d\n\n"
    "data\n\n"                      # a field with no colon: empty data line
    "id: bad\0id\ndata: keeps s.1\n\n"
    "retry: 12x\nignored: field\n\n"  # invalid retry, unknown field, an empty event (not dispatched)
    "data: one\r\ndata: two\r\n\r\n"  # split after a CR, the LF must not end the event early
    "data: last\r\n\r"
    "\n"
    "data: unterminated"
)


EXPECTED_PARSE: list[dict[str, Any]] = [
    {"kind": "comment", "text": "hello"},
    {"kind": "retry", "ms": 1500},
    {"kind": "event", "type": "message", "data": '{"a":1}', "lastEventId": "s.0"},
    {"kind": "comment", "text": "keepalive"},
    {"kind": "event", "type": "other", "data": "x", "lastEventId": "s.0"},
    {"kind": "event", "type": "message", "data": "no space\n two spaces", "lastEventId": "s.0"},
    {"kind": "event", "type": "message", "data": "caf\u00e9 \U0001f600 \u4e2d", "lastEventId": "s.1"},
    {"kind": "event", "type": "message", "data": "", "lastEventId": "s.1"},
    {"kind": "event", "type": "message", "data": "keeps s.1", "lastEventId": "s.1"},
    {"kind": "event", "type": "message", "data": "one\ntwo", "lastEventId": "s.1"},
    {"kind": "event", "type": "message", "data": "last", "lastEventId": "s.1"},
]


def test_parser_expectation_agrees_with_the_relays_own_decoder() -> None:
    events = SSEDecoder().feed(PARSER_STREAM.encode())
    assert [{"kind": "event", "type": e.event, "data": e.data, "lastEventId": e.id} for e in events] == \
        [r for r in EXPECTED_PARSE if r["kind"] == "event"]


async def test_fetch_parser_handles_any_split_of_crlf_utf8_and_events(bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")))
    raw = list(PARSER_STREAM.encode())
    results = await bp.page.evaluate(
        """async (raw) => {
             const { SSEParser } = await import("/static/sse-parser.js");
             const bytes = new Uint8Array(raw);
             const run = (cuts) => {
               const p = new SSEParser();
               const out = [];
               let at = 0;
               for (const cut of [...cuts, bytes.length]) {
                 out.push(...p.feed(bytes.slice(at, cut)));
                 at = cut;
               }
               p.end();
               return JSON.stringify(out);
             };
             const runs = { whole: run([]), bytewise: run([...Array(bytes.length).keys()].slice(1)) };
             const splits = new Set();
             for (let i = 1; i < bytes.length; i++) splits.add(run([i]));
             for (let i = 1; i < bytes.length; i += 3)
               for (let j = i + 1; j < bytes.length; j += 5) splits.add(run([i, j]));
             runs.splits = [...splits];
             return runs;
           }""", raw)
    assert json.loads(results["whole"]) == EXPECTED_PARSE
    assert json.loads(results["bytewise"]) == EXPECTED_PARSE
    assert [json.loads(s) for s in results["splits"]] == [EXPECTED_PARSE]


async def test_screenshot_of_a_finished_answer(bp: BrowserPage, make_relay: RelayFactory,
                                               upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(ANSWER)
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("Show me a loop in Python")
    await bp.wait_until_finished("done")
    await expect(bp.answer().locator("pre code")).to_have_text("for i in range(3):\n    print(i, 'ü😀')")
    ARTIFACTS.mkdir(exist_ok=True)
    await bp.page.screenshot(path=str(ARTIFACTS / "page-finished-answer.png"))
    await bp.page.set_viewport_size({"width": 375, "height": 720})
    await bp.page.screenshot(path=str(ARTIFACTS / "page-finished-answer-phone.png"))
    overflow = await bp.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width"


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_relay_with_tokens_asks_for_one_then_answers(transport: str, bp: BrowserPage, make_relay: RelayFactory,
                                                           upstream: FakeUpstream, tmp_path: Path) -> None:
    token = "page-token-" + "t" * 24
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(token + "\n")
    upstream.behaviour = tokens(["behind", " a token"])
    relay = await make_relay(tokens_file=tokens_file)
    urls: list[str] = []
    bp.page.on("request", lambda request: urls.append(request.url))
    await bp.open(str(relay.make_url("/")), transport)
    await bp.ask("hello?")
    await bp.wait_until_finished("error")
    await expect(bp.page.locator("#token-form")).to_be_visible()
    await expect(bp.answer().locator(".note")).to_contain_text("token")
    assert upstream.calls == 0
    bp.problems[:] = [p for p in bp.problems if "401" not in p]  # the refusal it was provoked into
    await bp.page.fill("#token-input", token)
    await bp.page.click("#token-save")
    await expect(bp.page.locator("#token-form")).to_be_hidden()
    await bp.ask("now?")
    await bp.wait_until_finished("done")
    assert await bp.answer_text() == "behind a token"
    assert upstream.calls == 1
    # The token stays out of every URL the page used (EventSource opened a signed events URL).
    assert urls and token not in "".join(urls)
    if transport == "eventsource":
        assert any("sig=" in url for url in urls)
