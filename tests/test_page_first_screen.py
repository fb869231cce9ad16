"""The page's first screen and its long answers, in Chromium: what a first-time user sees before
asking anything, the phone drawer, and a long answer's rendering cost per frame.
Fixtures: tests/test_page.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeUpstream, RelayFactory, tokens
from test_page import ARTIFACTS, BrowserPage, bp, browser  # noqa: F401  (fixtures)
from test_page_features import AXE

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover
    pass


async def test_an_empty_page_says_what_this_is_and_that_the_demo_answers(
        bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay(upstream=None, model=None, demo_token_delay=0.0)
    await bp.open(str(relay.make_url("/")))
    hint = bp.page.locator("#empty-state")
    await expect(hint).to_be_visible()
    await expect(hint).to_contain_text("relay-demo")  # which model answers
    await expect(bp.page.locator("#empty-demo")).to_be_visible()
    await expect(hint).to_contain_text("demo model")
    await expect(bp.page.locator("#demo")).to_be_visible()  # before any answer
    await bp.ask("hello")
    await bp.wait_until_finished("done")
    await expect(hint).to_be_hidden()
    await bp.page.click("#new-chat")
    await expect(hint).to_be_visible()
    await expect(bp.page.locator("#demo")).to_be_visible()  # still the demo relay


async def test_with_a_real_upstream_the_hint_names_its_model_and_no_demo_badge(
        bp: BrowserPage, make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")))
    hint = bp.page.locator("#empty-state")
    await expect(hint).to_contain_text("fake-model")
    await expect(bp.page.locator("#empty-demo")).to_be_hidden()
    await expect(bp.page.locator("#demo")).to_be_hidden()


@pytest.mark.parametrize("width,height", [(1280, 900), (390, 844)], ids=["desktop-1280x900", "phone-390x844"])
async def test_an_empty_page_has_no_vertical_scrollbar(bp: BrowserPage, make_relay: RelayFactory,
                                                      width: int, height: int) -> None:
    await bp.page.set_viewport_size({"width": width, "height": height})
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")))
    overflow = await bp.page.evaluate("document.documentElement.scrollHeight - window.innerHeight")
    assert overflow <= 0, f"{overflow}px taller than the window"


async def test_the_phone_drawer_dims_the_chat_and_closes_on_a_tap_outside(
        bp: BrowserPage, make_relay: RelayFactory) -> None:
    await bp.page.set_viewport_size({"width": 390, "height": 844})
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")))
    backdrop = bp.page.locator("#backdrop")
    await expect(backdrop).to_be_hidden()
    await bp.page.click("#menu")
    await expect(bp.page.locator("#sidebar")).to_be_visible()
    await expect(backdrop).to_be_visible()
    color = await backdrop.evaluate("el => getComputedStyle(el).backgroundColor")
    assert color.startswith("rgba(") and not color.endswith(", 0)"), color  # it dims
    await bp.page.mouse.click(370, 600)  # on the chat, beside the drawer
    await expect(bp.page.locator("#sidebar")).to_be_hidden()
    await expect(backdrop).to_be_hidden()
    assert await bp.page.get_attribute("#menu", "aria-expanded") == "false"


async def test_a_long_answers_render_cost_per_frame_does_not_grow_with_its_length(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    """Nodes added to the answer while it streams, frame by frame: all the streaming frames of a
    600-paragraph answer together add about as many nodes as the answer has (each frame renders
    what is new and its last block again); re-rendering everything each frame would add the
    answer so far in every frame, several times the answer's size over ten frames or more.  (A
    count of nodes, not of time: a loaded machine batches more per frame, and that is fine.)"""
    parts = [f"Paragraph {i} with **bold** and `code` and a [link](https://example.com/{i}).\n\n"
             for i in range(600)]
    upstream.behaviour = tokens(parts, delay=0.002)
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.page.evaluate("""() => {
      window.__frames = [];
      let added = 0;
      new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) if (n.closest && n.closest('.msg.assistant .content'))
          added += 1 + (n.querySelectorAll ? n.querySelectorAll('*').length : 0);
      }).observe(document.getElementById('log'), { childList: true, subtree: true });
      const tick = () => { if (added) { window.__frames.push(added); added = 0; } requestAnimationFrame(tick); };
      requestAnimationFrame(tick);
    }""")
    await bp.ask("a long one")
    await bp.wait_until_finished("done")
    frames: list[int] = await bp.page.evaluate("window.__frames")
    assert len(frames) >= 10, frames
    streaming = frames[:-1]  # the last frame is the final full render, once
    paragraphs = await bp.answer().locator(".content > p").count()
    assert paragraphs == 600
    nodes = 1 + await bp.answer().locator(".content *").count()
    assert sum(streaming) <= 2 * nodes, (sum(streaming), nodes, len(streaming))
    assert await bp.answer_text() == "".join(parts)


async def test_a_link_whose_unsafe_address_was_removed_is_shown_as_text(
        bp: BrowserPage, make_relay: RelayFactory, upstream: FakeUpstream) -> None:
    upstream.behaviour = tokens(["see [click me](javascript:alert(1)) and [ok](https://example.com/)"])
    relay = await make_relay()
    await bp.open(str(relay.make_url("/")), "fetch")
    await bp.ask("links")
    await bp.wait_until_finished("done")
    content = bp.answer().locator(".content")
    await expect(content).to_contain_text("click me")
    assert await content.locator("a").count() == 1
    assert await content.locator("a").get_attribute("href") == "https://example.com/"


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_the_first_screen_passes_axe(scheme: str, bp: BrowserPage, make_relay: RelayFactory) -> None:
    await bp.page.emulate_media(color_scheme=scheme)
    await bp.page.route("**/static/__axe__.js", lambda route: route.fulfill(
        body=Path(AXE).read_bytes(), content_type="text/javascript"))
    relay = await make_relay(upstream=None)
    await bp.open(str(relay.make_url("/")))
    await expect(bp.page.locator("#empty-state")).to_be_visible()
    await bp.page.add_script_tag(url="/static/__axe__.js")
    result: Any = await bp.page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    bad = [{"id": v["id"], "impact": v["impact"]} for v in result["violations"]
           if v["impact"] in ("serious", "critical")]
    assert bad == [], json.dumps(bad, indent=1)
    ARTIFACTS.mkdir(exist_ok=True)
    await bp.page.screenshot(path=str(ARTIFACTS / f"page-first-screen-{scheme}.png"))
