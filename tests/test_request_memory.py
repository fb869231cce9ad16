"""A stream does not keep its request for its whole answer: the client's body (raw and parsed)
and the upstream request built from it are let go once the answer is under way.  A long
conversation is kilobytes to megabytes per request; held by every open stream, it was the
largest thing a stream kept (the tests below fail on main: the raw body stayed cached in the
request, the parsed body in the handler's frame, the upstream body in the generation and the
pool's route)."""

from __future__ import annotations

import gc
import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from conftest import FakeUpstream, SSEClient, paused


def holders(marker: str, upstream: FakeUpstream) -> list[str]:
    """What in this process still holds the request: the raw bytes, or a container of the parsed text.

    The fake upstream's own copy (what it received, kept in ``upstream.requests``, and the raw bytes
    of its request still being answered, written without spaces) is not the relay's: it is left out.
    """
    theirs = {id(r) for r in upstream.requests}
    for r in upstream.requests:
        theirs.add(id(r.get("messages")))
        theirs.update(id(m) for m in r.get("messages") or ())
    needle = marker.encode()
    found: list[str] = []
    gc.collect()
    for obj in gc.get_objects():
        if id(obj) in theirs or obj is upstream.requests:
            continue
        for ref in gc.get_referents(obj):
            # (the client's spacing: the relay and the fake write JSON without it)
            if isinstance(ref, (bytes, bytearray)) and b'": "' + needle in ref:
                found.append(f"raw body in {type(obj).__name__}")
            elif isinstance(ref, dict) and id(ref) not in theirs and (
                    ref.get("prompt") == marker or ref.get("content") == marker):
                found.append(f"parsed body in {type(obj).__name__}")
    return sorted(set(found))


async def _first_delta(client: SSEClient) -> None:
    while True:
        event = await client.next_json()
        assert event is not None
        if event.get("type") == "delta" or event.get("choices"):
            return


def _chat(marker: str) -> tuple[str, str]:
    return "/chat", json.dumps({"prompt": marker})


def _v1(marker: str) -> tuple[str, str]:
    return "/v1/chat/completions", json.dumps(
        {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": marker}]})


@pytest.mark.parametrize("request_of", [_chat, _v1], ids=["chat", "v1"])
async def test_an_open_stream_holds_neither_its_request_body_nor_the_upstream_request(
        make_relay: Any, upstream: FakeUpstream, request_of: Callable[[str], tuple[str, str]]) -> None:
    upstream.behaviour = paused("Hello", " end")
    relay = await make_relay()
    marker = "conversation-" + secrets.token_hex(16) + " " * 2000
    path, data = request_of(marker)
    resp = await relay.post(path, data=data, headers={"Content-Type": "application/json"})
    client = SSEClient(resp)
    await _first_delta(client)  # committed: the answer is under way, no failover will need the body
    assert holders(marker, upstream) == []
    upstream.release.set()
    while await client.next() is not None:
        pass


async def test_the_helper_finds_a_body_that_is_held(make_relay: Any, upstream: FakeUpstream) -> None:
    # The check above can fail: a parsed body and raw bytes kept by the test itself are found.
    marker = "conversation-" + secrets.token_hex(16)
    kept = [{"prompt": marker}, json.dumps({"prompt": marker}).encode()]
    assert holders(marker, upstream) == ["parsed body in list", "raw body in list"]  # (sorted)
    del kept
