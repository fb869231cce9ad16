"""A burst larger than the replay log reaches a client that keeps reading, under either event loop.

An honest answer of 20,000 chunks written at once (compressed, or plain: uvloop reads 256 KiB a
time) must not cost a reading ``/v1`` client its answer: backpressure pauses the upstream while
the client is behind, and only a client that stops reading is cut (relay/core/generation.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import aiohttp
import pytest

from conftest import FakeUpstream, chunk, chunked, raw_upstream, require, sse
from procs import NotifyListener, port_of, spawn_relay
from test_upstream_http import SSE_HEAD, STREAM, V1, gzip_pieces

CHUNKS = 20_000
PAD = "-" + "x" * 80


@pytest.mark.parametrize("coding", ["gzip", "plain"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_burst_of_20000_chunks_reaches_a_reading_client_whole(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener, loop: str, coding: str) -> None:
    if loop == "uvloop":
        require(importlib.util.find_spec("uvloop") is not None, "uvloop is not installed (pip install uvloop)")
    # About 240 bytes a chunk: the burst (4.8 MB) is larger than four replay logs.
    parts = [sse(chunk(f"t{i}" + PAD, role="assistant" if i == 0 else None)) for i in range(CHUNKS)]
    parts += [sse(chunk(finish_reason="stop")), sse("[DONE]")]
    if coding == "gzip":
        body = b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
            b"".join(gzip_pieces([b"".join(parts)]))) + b"0\r\n\r\n"
    else:
        body = b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"".join(parts)) + b"0\r\n\r\n"
    async with raw_upstream(SSE_HEAD + body) as url:
        async with spawn_relay(tmp_path, upstream, "--upstream", url, "--loop", loop, "--log-level", "warning",
                               notify=notify) as relay, aiohttp.ClientSession() as session:
            port = port_of(await notify.until("READY"))
            async with session.post(f"http://127.0.0.1:{port}{V1}", json=STREAM) as resp:
                assert resp.status == 200, relay.output()
                raw = await resp.read()
    datas = [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert datas[-1] == b"[DONE]", raw[-500:]
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for d in datas[:-2]]
    assert contents == [f"t{i}" + PAD for i in range(CHUNKS)]
