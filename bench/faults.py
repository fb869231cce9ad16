"""The faults phase: what Redis stopping costs the clients (bench/RESULTS.md, docs/scale-out.md).

Two relay processes (A and B) share one Redis.  A stream runs on A, with a reader on A and a
reader on B (a resume that landed there).  Redis is then stopped (SIGSTOP) and, while it is:

- ``reader_end_s``: how long B's reader waits until it gets its end (an event, or the connection
  closing), from the stop;
- ``create_s``: how long a ``POST /chat`` (``Accept: application/json``, the 201) takes on A, one
  after another, ten of them;
- ``resume_elsewhere_s``: how long a resume on B of A's stream takes to be answered (the 503);
- ``local_reader_events``: that A's own reader kept receiving events meanwhile.

Each wait is capped at ``CAP`` seconds (then reported as the cap); Redis is resumed after them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import Any

from bench.wire import request_body

CAP = 15.0


async def _first_events(resp: Any, count: int) -> list[bytes]:
    """The ids of the first ``count`` events (``id:`` lines)."""
    ids: list[bytes] = []
    while len(ids) < count:
        line = await resp.content.readline()
        if not line:
            raise RuntimeError("the stream ended early")
        if line.startswith(b"id:"):
            ids.append(line[3:].strip())
    return ids


async def _until_end(resp: Any) -> tuple[float, str]:
    """Seconds until the response's next error event or its end, and which."""
    began = time.monotonic()
    while True:
        line = await resp.content.readline()
        if not line:
            return time.monotonic() - began, "closed"
        if line.startswith(b"data:") and b'"type":"error"' in line:
            return time.monotonic() - began, "error event"


async def _timed(coro: Any) -> float:
    began = time.monotonic()
    try:
        async with asyncio.timeout(CAP):
            await coro
    except TimeoutError:
        return CAP
    return time.monotonic() - began


async def run(port_a: int, port_b: int, redis_pid: int) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        body = request_body("faults", 4000, 0.005, openai=False)
        local = await session.post(f"http://127.0.0.1:{port_a}/chat", data=body,
                                   headers={"Content-Type": "application/json"})
        ids = await _first_events(local, 5)
        location = local.headers["Location"]
        await asyncio.sleep(0.5)  # A's writer is a round trip behind its own reader
        far = None
        for _ in range(100):
            far = await session.get(f"http://127.0.0.1:{port_b}{location}", headers={"Last-Event-ID": ids[0].decode()})
            if far.status == 200:
                break
            far.close()
            await asyncio.sleep(0.05)
        assert far is not None and far.status == 200, "B could not resume A's stream"
        await _first_events(far, 2)
        local_events = 0

        async def count_local() -> None:
            nonlocal local_events
            while await local.content.readline():
                local_events += 1

        counter = asyncio.create_task(count_local())
        ended = asyncio.create_task(_until_end(far))
        os.kill(redis_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            creates: list[float] = []
            for _ in range(10):
                if sum(creates) > 30:
                    break  # (each waits the client library's socket timeout: three say enough)
                async def create() -> None:
                    resp = await session.post(f"http://127.0.0.1:{port_a}/chat", data=body,
                                              headers={"Content-Type": "application/json", "Accept": "application/json"})
                    await resp.read()
                creates.append(await _timed(create()))

            async def resume() -> None:
                resp = await session.get(f"http://127.0.0.1:{port_b}{location}", headers={"Last-Event-ID": ids[0].decode()})
                out["resume_elsewhere_status"] = resp.status
                resp.close()

            out["resume_elsewhere_s"] = round(await _timed(resume()), 3)
            try:
                async with asyncio.timeout(max(0.1, CAP - (time.monotonic() - stopped_at))):
                    waited, how = await ended
                out["reader_end_s"] = round(time.monotonic() - stopped_at, 3)
                out["reader_end"] = how
            except TimeoutError:
                out["reader_end_s"], out["reader_end"] = CAP, "none within the cap"
            before = local_events
            await asyncio.sleep(0.5)
            out["local_reader_events_while_stopped"] = local_events
            out["local_reader_flowing"] = local_events > before
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        out["create_s"] = {"first": round(creates[0], 3), "p50": round(statistics.median(creates), 3),
                           "max": round(max(creates), 3)}
        counter.cancel()
        ended.cancel()
        local.close()
        far.close()
    return out


def measure(port_a: int, port_b: int, redis_pid: int) -> dict[str, Any]:
    return asyncio.run(run(port_a, port_b, redis_pid))
