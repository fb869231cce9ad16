"""The chat page's features in a real Chromium: Markdown (streamed, split anywhere, hostile), the
model picker, conversations, copy, regenerate, edit, thinking and tool calls, the phone layout,
keyboard use and accessibility (axe-core, light and dark).  Fixtures: tests/test_page.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import FakeUpstream, RelayFactory, chunk, sse, tokens
from test_page import ARTIFACTS, BrowserPage, browser, bp, held  # noqa: F401 (fixtures)

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover - the fixtures skip (or fail under RELAY_REQUIRE_ALL)
    pass

AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"

RICH = ("Here is **bold** and `inline code`, a [link](https://example.com/docs \"docs\"):\n\n"
        "- one\n- two with *emphasis*\n\n"
        "| name | left | mid | right |\n|:-----|:-----|:---:|------:|\n| a | b | c | d |\n| e | f | g | h |\n\n"
        "> a quote\n\n"
        "```python\ndef f(x):\n    return x + 1  # add one\n```\n\n1. first\n2. second\n")


def split_every(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def ask_and_finish(bp: BrowserPage, text: str, state: str = "done") -> None:
    await bp.ask(text)
    await bp.wait_until_finished(state)


async def content_html(bp: BrowserPage, index: int = -1) -> str:
    html: str = await bp.page.evaluate(
        "i => [...document.querySelectorAll('.msg.assistant .content')].at(i).innerHTML", index)
    return html


async def test_streamed_markdown_renders_bold_lists_tables_and_highlighted_code(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(split_every(RICH, 7))
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await ask_and_finish(bp, "show me markdown")
    content = bp.answer().locator(".content")
    await expect(content.locator("strong")).to_have_text("bold")
    await expect(content.locator("em")).to_have_text("emphasis")
    await expect(content.locator(":not(pre) > code")).to_have_text("inline code")
    await expect(content.locator("ul > li")).to_have_count(2)
    await expect(content.locator("ol > li")).to_have_count(2)
    await expect(content.locator("blockquote")).to_have_text("a quote")
    await expect(content.locator("table tr")).to_have_count(3)
    # Alignment is a class: the CSP allows no style attribute.
    assert await content.locator("th.align-center").count() == 1
    assert await content.locator("td.align-right").count() == 2
    assert await content.locator("[style], [align]").count() == 0
    code = content.locator("pre code.language-python")
    await expect(code).to_have_text("def f(x):\n    return x + 1  # add one")
    assert await code.locator("span.hljs-keyword").count() >= 2  # def, return: highlighted
    assert await code.locator("span.hljs-comment").count() == 1
    link = content.locator("a")
    await expect(link).to_have_attribute("href", "https://example.com/docs")
    await expect(link).to_have_attribute("rel", "noopener noreferrer")
    await expect(link).to_have_attribute("target", "_blank")


@pytest.mark.parametrize("size", [1, 3, 11])
async def test_an_answer_split_at_awkward_places_renders_exactly_as_in_one_piece(
        size: int, bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    upstream.behaviour = tokens([RICH])
    await ask_and_finish(bp, "whole")
    whole = await content_html(bp)
    # Split inside the table row, the fence, the link and the emphasis markers.
    upstream.behaviour = tokens(split_every(RICH, size))
    await ask_and_finish(bp, "split")
    assert await content_html(bp) == whole
    assert "<table>" in whole and "hljs-keyword" in whole


async def test_hostile_markdown_runs_nothing_and_leaves_no_handler_or_dangerous_link(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    hostile = ("<img src=x onerror=\"window.__pwned=1\">\n\n<script>window.__pwned=2</script>\n\n"
               "[click](javascript:window.__pwned=3) and [data](data:text/html,<script>alert(4)</script>) and "
               "[vb](vbscript:msgbox) and <a href=\"#\" onclick=\"window.__pwned=5\">inline a</a>\n\n"
               "![pic](https://tracker.example/p.png) ![d](data:image/png;base64,AAAA)\n\n"
               "<details open ontoggle=\"window.__pwned=6\">x</details>\n\n[fine](https://example.com)\n")
    upstream.behaviour = tokens(split_every(hostile, 5))
    dialogs: list[str] = []
    bp.page.on("dialog", lambda d: dialogs.append(d.message))
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await ask_and_finish(bp, "be evil")
    content = bp.answer().locator(".content")
    assert await content.locator("script, img, iframe, svg, details").count() == 0
    handlers = await content.evaluate(
        "el => [...el.querySelectorAll('*')].flatMap(n => [...n.attributes].map(a => a.name))"
        ".filter(n => n.startsWith('on') || n === 'style')")
    assert handlers == []
    hrefs = await content.evaluate("el => [...el.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert all(h is None or h.startswith("https://") for h in hrefs), hrefs
    assert "https://example.com" in hrefs
    rels = await content.evaluate("el => [...el.querySelectorAll('a[href]')].map(a => a.rel + '|' + a.target)")
    assert set(rels) == {"noopener noreferrer|_blank"}
    await expect(content).to_contain_text('<img src=x onerror="window.__pwned=1">')  # shown as text
    await content.locator("a", has_text="fine").evaluate("a => a.dispatchEvent(new MouseEvent('mouseover'))")
    assert await bp.page.evaluate("window.__pwned") is None
    assert dialogs == []


async def test_the_model_picker_lists_the_models_and_its_choice_reaches_the_upstream_and_is_remembered(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    relay = await make_relay(models=("fake-model", "other-model"))
    await bp.open(str(relay.make_url("/")), "fetch")
    options = bp.page.locator("#models option")
    await expect(options).to_have_count(2)
    assert await options.evaluate_all("os => os.map(o => o.value)") == ["fake-model", "other-model"]
    await expect(bp.page.locator("#model")).to_have_attribute("placeholder", "fake-model")
    await ask_and_finish(bp, "default")
    assert upstream.requests[-1]["model"] == "fake-model"
    await bp.page.fill("#model", "other-model")
    await bp.page.press("#model", "Tab")
    await ask_and_finish(bp, "chosen")
    assert upstream.requests[-1]["model"] == "other-model"
    await bp.open(str(relay.make_url("/")))
    assert await bp.page.input_value("#model") == "other-model"


async def test_without_a_default_model_the_page_asks_for_one_instead_of_failing(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="relay")
    relay = await make_relay(model=None)
    assert any("every request must name a model" in r.getMessage() for r in caplog.records)
    await bp.open(str(relay.make_url("/")), "fetch")
    await expect(bp.page.locator("#status")).to_contain_text("pick one")
    # The upstream's own list fills the picker (the relay has none of its own).
    await expect(bp.page.locator("#models option")).to_have_count(1)
    await bp.ask("which model?")
    await expect(bp.page.locator("#status")).to_have_attribute("data-state", "needs-model")
    await expect(bp.page.locator("#model")).to_be_focused()
    assert await bp.page.input_value("#prompt") == "which model?"  # not lost
    assert upstream.calls == 0 and await bp.page.locator(".msg").count() == 0
    await bp.page.fill("#model", "fake-model")
    await bp.page.press("#model", "Tab")
    await bp.page.press("#prompt", "Enter")
    await bp.wait_until_finished("done")
    assert upstream.requests[-1]["model"] == "fake-model"


async def test_conversations_survive_a_reload_and_can_be_switched_renamed_exported_deleted_and_cleared(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    relay = await make_relay()
    url = str(relay.make_url("/"))
    await bp.open(url, "fetch")
    upstream.behaviour = tokens(["first answer"])
    await ask_and_finish(bp, "first topic")
    await bp.page.click("#new-chat")
    upstream.behaviour = tokens(["second answer"])
    await ask_and_finish(bp, "second topic")
    await bp.open(url)  # reload
    items = bp.page.locator("#conversations .conv-open")
    await expect(items).to_have_text(["second topic", "first topic"])
    assert await bp.answer_text() == "second answer"  # the current one is shown again
    await items.filter(has_text="first topic").click()
    await expect(bp.page.locator(".msg.user .content")).to_have_text("first topic")
    assert await bp.answer_text() == "first answer"
    # Continuing it sends its own history.
    upstream.behaviour = tokens(["more"])
    await ask_and_finish(bp, "go on")
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "first topic"}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "go on"}]
    # Rename.
    await bp.page.locator("#conversations .conv", has_text="first topic").locator(".conv-rename").click()
    await bp.page.fill(".conv-title-input", "Renamed one")
    await bp.page.press(".conv-title-input", "Enter")
    await expect(items.first).to_have_text("Renamed one")
    # Export as Markdown.
    async with bp.page.expect_download() as download:
        await bp.page.click("#export")
    exported = Path(await (await download.value).path()).read_text()
    assert exported.startswith("# Renamed one\n") and "## You\n\nfirst topic" in exported and "first answer" in exported
    await bp.open(url)
    await expect(items).to_have_text(["Renamed one", "second topic"])
    # Delete one, then clear the rest (two clicks).
    await bp.page.locator("#conversations .conv", has_text="second topic").locator(".conv-delete").click()
    await expect(items).to_have_text(["Renamed one"])
    await bp.page.click("#clear-all")
    await expect(items).to_have_count(1)  # the first click only arms it
    await bp.page.click("#clear-all")
    await expect(items).to_have_count(0)
    await expect(bp.page.locator(".msg")).to_have_count(0)
    await bp.open(url)
    await expect(items).to_have_count(0)


async def test_copy_puts_the_answer_and_a_code_block_on_the_clipboard(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    await bp.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer = "Run this:\n\n```bash\necho 'hi there'\n```\n"
    upstream.behaviour = tokens([answer])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await ask_and_finish(bp, "a command")
    await bp.answer().locator(".actions .copy").click()
    assert await bp.page.evaluate("navigator.clipboard.readText()") == answer
    await bp.answer().locator("pre .copy-code").click()
    assert await bp.page.evaluate("navigator.clipboard.readText()") == "echo 'hi there'"
    await expect(bp.answer().locator("pre .copy-code")).to_have_text("Copied")


async def test_regenerate_starts_a_new_generation_for_the_last_answer(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    upstream.behaviour = tokens(["take one"])
    await ask_and_finish(bp, "answer me")
    upstream.behaviour = tokens(["take two"])
    await bp.answer().locator(".regenerate").click()
    await expect(bp.answer()).to_have_attribute("data-state", "done")
    await expect(bp.answer().locator(".content")).to_have_text("take two")
    assert upstream.calls == 2
    assert upstream.requests[1]["messages"] == [{"role": "user", "content": "answer me"}]
    await expect(bp.page.locator(".msg.assistant")).to_have_count(1)


async def test_edit_and_resend_the_last_message(bp: BrowserPage, make_relay: RelayFactory,
                                                upstream: FakeUpstream) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    upstream.behaviour = tokens(["about cats"])
    await ask_and_finish(bp, "tell me about cats")
    await bp.page.locator(".msg.user .edit").click()
    assert await bp.page.input_value("#prompt") == "tell me about cats"
    await expect(bp.page.locator(".msg")).to_have_count(0)
    await bp.page.fill("#prompt", "tell me about dogs")
    upstream.behaviour = tokens(["about dogs"])
    await bp.page.press("#prompt", "Enter")
    await bp.wait_until_finished("done")
    assert upstream.requests[1]["messages"] == [{"role": "user", "content": "tell me about dogs"}]
    await expect(bp.page.locator(".msg.user .content")).to_have_text("tell me about dogs")


async def test_reasoning_streams_into_a_thinking_section_that_folds_when_the_answer_starts_and_tool_calls_show(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    go = asyncio.Event()

    async def thinker(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk(role="assistant", reasoning_content="Let me think")))
        await fake.send(resp, sse(chunk(reasoning_content=" about it.")))
        await go.wait()
        await fake.send(resp, sse(chunk("The answer is 42.")))
        await fake.send(resp, sse(chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}])))
        await fake.send(resp, sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": "{\"city\": "}}])))
        await fake.send(resp, sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": "\"Paris\"}"}}])))
        await fake.send(resp, sse(chunk(finish_reason="tool_calls")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    upstream.behaviour = thinker
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("think")
    thinking = bp.answer().locator("details.thinking")
    await expect(thinking.locator(".thinking-body")).to_have_text("Let me think about it.")
    assert await thinking.evaluate("d => d.open") is True  # open while it is all there is
    go.set()
    await bp.wait_until_finished("done")
    assert await thinking.evaluate("d => d.open") is False  # folded once the answer started
    await expect(bp.answer().locator(".content")).to_have_text("The answer is 42.")
    await expect(bp.answer().locator(".tool-call .tool-name")).to_have_text("get_weather")
    await expect(bp.answer().locator(".tool-call .tool-args")).to_have_text('{"city": "Paris"}')


async def test_auto_scroll_stops_while_the_user_reads_above_and_resumes_at_the_bottom(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    gates = [asyncio.Event() for _ in range(3)]
    lines = "".join(f"line {i}\n\n" for i in range(60))
    upstream.behaviour = held([lines, "more one\n\n" * 20, "more two\n\n" * 20, "end"], gates)
    relay = await make_relay()
    await bp.page.set_viewport_size({"width": 800, "height": 500})
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("long")
    await bp.wait_for_text("line 59")
    at_bottom = "window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80"
    await bp.page.wait_for_function(at_bottom)  # it followed the answer down
    await bp.page.evaluate("window.scrollTo(0, 100)")
    gates[0].set()
    await bp.wait_for_text("more one")
    await bp.page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    assert await bp.page.evaluate("window.scrollY") == 100  # left where the user is reading
    await bp.page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    gates[1].set()
    await bp.wait_for_text("more two")
    await bp.page.wait_for_function(at_bottom)
    gates[2].set()
    await bp.wait_until_finished("done")


async def test_on_a_phone_the_header_is_one_row_nothing_overlaps_and_the_input_stays_visible_with_the_keyboard(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["A **short** answer for a small screen."])
    relay = await make_relay()
    await bp.page.set_viewport_size({"width": 390, "height": 844})
    await bp.open(str(relay.make_url("/")))
    await ask_and_finish(bp, "hi from a phone")
    header = await bp.page.locator("header").bounding_box()
    first = await bp.page.locator(".msg").first.bounding_box()
    buttons = await bp.page.locator("header > *:visible").evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; })")
    assert header is not None and first is not None
    assert header["height"] < 60, "the header wrapped to more than one row"
    assert all(top >= header["y"] - 1 and bottom <= header["y"] + header["height"] + 1 for top, bottom in buttons)
    assert header["y"] + header["height"] <= first["y"], "the header covers the first message"
    assert await bp.page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    ARTIFACTS.mkdir(exist_ok=True)
    await bp.page.screenshot(path=str(ARTIFACTS / "page-phone.png"))
    # The conversations drawer opens from the menu and closes with Escape.
    await bp.page.click("#menu")
    await expect(bp.page.locator("#sidebar")).to_be_visible()
    await bp.page.keyboard.press("Escape")
    await expect(bp.page.locator("#sidebar")).to_be_hidden()
    # The on-screen keyboard takes the lower half: the composer is still on screen.
    await bp.page.focus("#prompt")
    await bp.page.set_viewport_size({"width": 390, "height": 420})
    box = await bp.page.locator("#prompt").bounding_box()
    send = await bp.page.locator("#send").bounding_box()
    assert box is not None and send is not None
    assert 0 <= box["y"] and box["y"] + box["height"] <= 420 and send["y"] + send["height"] <= 420


async def test_every_control_works_from_the_keyboard_with_a_visible_focus(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["keyboard answer"])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.page.keyboard.type("typed with keys")
    await bp.page.keyboard.press("Enter")
    await bp.wait_until_finished("done")
    seen = []
    for _ in range(40):  # bounded: Tab through the page once
        await bp.page.keyboard.press("Tab")
        focused = await bp.page.evaluate(
            "() => { const e = document.activeElement; const s = getComputedStyle(e);"
            " return [e.id || e.className || e.tagName, s.outlineStyle, s.outlineWidth]; }")
        seen.append(focused[0])
        if focused[0] in ("new-chat", "regenerate", "copy", "conv-open", "export", "transport"):
            assert focused[1] != "none" and focused[2] != "0px", f"no visible focus on {focused[0]}"
    for control in ("model", "new-chat", "conv-open", "export", "transport", "token-button", "copy", "regenerate",
                    "prompt", "send"):
        assert control in seen, f"{control} cannot be reached with Tab: {seen}"
    # Regenerate from the keyboard.
    upstream.behaviour = tokens(["again"])
    await bp.page.focus(".regenerate")
    await bp.page.keyboard.press("Enter")
    await expect(bp.answer().locator(".content")).to_have_text("again")


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_serious_or_critical_violation(scheme: str, bp: BrowserPage, make_relay: RelayFactory,
                                                         upstream: FakeUpstream) -> None:
    assert AXE.is_file(), "tests/vendor/axe.min.js is missing (scripts/vendor-web)"
    await bp.page.emulate_media(color_scheme=scheme)
    # axe comes in as a same-origin script the test serves (the CSP is not bypassed).
    await bp.page.route("**/static/__axe__.js", lambda route: route.fulfill(
        body=AXE.read_bytes(), content_type="text/javascript"))
    upstream.behaviour = tokens(split_every(RICH, 9))
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await ask_and_finish(bp, "everything at once")
    await bp.page.add_script_tag(url="/static/__axe__.js")
    result = await bp.page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    bad = [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert bad == [], json.dumps(bad, indent=1)
    ARTIFACTS.mkdir(exist_ok=True)
    await bp.page.screenshot(path=str(ARTIFACTS / f"page-desktop-{scheme}.png"), full_page=True)
    if scheme == "dark":
        bg = await bp.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(17, 20, 24)"


def test_vendored_libraries_are_listed_with_their_versions_and_licences() -> None:
    vendor = Path(__file__).resolve().parent.parent / "relay" / "web" / "vendor"
    listing = (vendor / "VERSIONS.md").read_text()
    for name, licence in (("marked", "LICENSE.marked"), ("DOMPurify", "LICENSE.dompurify"),
                          ("highlight.js", "LICENSE.highlight.js")):
        assert name in listing and (vendor / licence).is_file()
    assert (Path(__file__).resolve().parent / "vendor" / "LICENSE.axe-core").is_file()
    page = (vendor.parent / "index.html").read_text() + (vendor.parent / "markdown.js").read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # no CDN


async def test_leaving_a_conversation_mid_answer_keeps_that_answer_in_it_and_out_of_the_next(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    never = asyncio.Event()
    upstream.behaviour = held(["partial ", "never"], [never])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("first")
    await bp.wait_for_text("partial ")
    await bp.page.click("#new-chat")
    await asyncio.wait_for(upstream.closed.wait(), 10)  # the old generation was stopped
    await expect(bp.page.locator(".msg")).to_have_count(0)
    upstream.behaviour = tokens(["second answer"])
    await ask_and_finish(bp, "second")
    await expect(bp.page.locator(".msg")).to_have_count(2)
    assert upstream.requests[-1]["messages"] == [{"role": "user", "content": "second"}]
    await bp.page.locator("#conversations .conv-open", has_text="first").click()
    await expect(bp.page.locator(".msg")).to_have_count(2)
    assert await bp.answer_text() == "partial "
    await expect(bp.answer().locator(".note")).to_have_text("Stopped")
