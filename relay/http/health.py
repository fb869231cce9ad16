"""What a load balancer or systemd-side check polls: ``GET /healthz`` and ``GET /readyz``; and
what an operator reads: ``GET /v1/upstreams``.

``/healthz`` says the process answers (its event loop runs): restart it when this fails.
``/readyz`` says whether an upstream is reachable with its key (with several, any one will
do): send traffic elsewhere while it fails.  It is public, so it is a summary that names no
upstream.  ``GET /v1/upstreams`` (behind the access token, like the API) has each upstream's
state (ok, cooling down for how long and why, down) and its counters; never a key or URL.  The probe (``GET {base}/models`` with the key) is cached for
``PROBE_TTL`` seconds and shared by concurrent polls, so polling costs the upstream at most
one request per TTL however many balancers ask.  The answer never carries the key nor the
upstream's own text (OpenAI's 401 message quotes part of the key).

Any HTTP answer counts as reachable except 401/403 (the relay's key is refused: no chat can
succeed) and 5xx; a 404 counts as reachable because some upstreams (an Azure OpenAI deployment
URL) have no ``/models`` under their base.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aiohttp
from aiohttp import web

from relay.http.appkeys import PROBE, REGISTRY, UPSTREAMS
from relay.http.errors import json_response
from relay.openfiles import open_files
from relay.upstream.client import UpstreamClient
from relay.upstream.pool import Pool

PROBE_TTL: Final = 5.0
PROBE_TIMEOUT: Final = 5.0


class ReadinessProbe:
    """The cached, single-flight upstream probe: ``await check()`` → (ready, reason)."""

    def __init__(self, pool: Pool, *, ttl: float = PROBE_TTL, timeout: float = PROBE_TIMEOUT) -> None:
        self._clients = [m.client for m in pool.members]
        self._ttl = ttl
        self._timeout = timeout
        self._result: tuple[bool, str] | None = None
        self._checked = 0.0
        self._inflight: asyncio.Task[tuple[bool, str]] | None = None

    async def check(self) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        if self._result is not None and loop.time() - self._checked < self._ttl:
            return self._result
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._probe(), name="readiness-probe")
        # Shielded: a poller that hangs up must not cancel the probe the others are waiting for.
        return await asyncio.shield(self._inflight)

    async def _probe(self) -> tuple[bool, str]:
        try:
            results = await asyncio.gather(*(self._one(client) for client in self._clients))
        finally:
            self._inflight = None
        if len(results) == 1:
            result = results[0]
        else:
            up = sum(ok for ok, _ in results)
            result = ((True, f"{up} of {len(results)} upstreams are reachable") if up
                      else (False, f"none of the {len(results)} upstreams is reachable"))
        self._result, self._checked = result, asyncio.get_running_loop().time()
        return result

    async def _one(self, client: UpstreamClient) -> tuple[bool, str]:
        try:
            status = await client.probe(self._timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return False, f"the upstream is unreachable ({type(exc).__name__})"
        if status in (401, 403):
            return False, f"the upstream refuses the relay's credentials (HTTP {status})"
        if status >= 500:
            return False, f"the upstream answers HTTP {status}"
        return True, "the upstream is reachable"

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])




async def healthz(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    count, limit = open_files()
    # How close the process is to its open-file limit: every connection is a descriptor.
    body: dict[str, object] = {"status": "ok", "live_streams": registry.live, "open_files": count,
                               "open_files_limit": limit,
                               # Held back because every reader is stalled (backpressure).
                               "paused_streams": sum(1 for gen in registry.running() if gen.paused),
                               # Finished /chat streams kept for resume (--stream-ttl, --retention-bytes).
                               "kept_streams": registry.kept,
                               # Every task of the loop: one that grows with no load leaks.
                               "tasks": len(asyncio.all_tasks())}
    store = registry.store
    # The shared store's health and cost: reachable now, and round trips per event written.
    if (health := store.health()) is not None:
        body["store"] = health
    return json_response(body)


async def readyz(request: web.Request) -> web.Response:
    ready, reason = await request.app[PROBE].check()
    return json_response({"status": "ready" if ready else "not ready", "reason": reason},
                         status=200 if ready else 503, headers={"Cache-Control": "no-store"})


async def upstreams_state(request: web.Request) -> web.Response:
    return json_response({"upstreams": request.app[UPSTREAMS].state()}, headers={"Cache-Control": "no-store"})
