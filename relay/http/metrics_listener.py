"""The metrics listener (``--metrics-listen``): ``GET /metrics`` on an address of its own.

Never on the public port: a scrape needs no token there, and the public port shows nothing of
it (``/metrics`` is a 404).  The exposition is ``prometheus-client``'s own (its aiohttp
handler, with content negotiation for OpenMetrics).  One process serves its own registry; a
``--workers`` supervisor serves the merge of its workers' value files (relay/run/workers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from relay.config import Config
from relay.validation import parse_listen
from relay.http.appkeys import CATALOG, CONFIG, METRICS, UPSTREAMS

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from relay.metrics import Metrics

log = logging.getLogger("relay")


def make_metrics(config: Config) -> Metrics | None:
    """The app's metrics when they are asked for (the library is imported only then)."""
    if config.metrics_listen is None:
        return None
    from relay.metrics import Metrics

    return Metrics(total_timeout=config.total_timeout)


async def serve_metrics(listen: str, registry: Collector) -> tuple[web.AppRunner, str]:
    """Start the listener on ``listen`` (HOST:PORT); its runner and URL.  SystemExit if it cannot bind."""
    from prometheus_client.aiohttp import make_aiohttp_handler

    host, port = parse_listen(listen, "--metrics-listen")
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry), allow_head=False)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"relay: error: cannot listen for metrics on {listen}: {exc.strerror}") from None
    address = runner.addresses[0]
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    return runner, f"http://{shown}:{address[1]}/metrics"


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Wire the metrics to the pool, store and catalog; sample the loop; serve them, unless a
    supervisor does (then this process is a worker writing to the shared value files)."""
    metrics = app[METRICS]
    if metrics is None:
        yield
        return
    from relay.metrics import supervised

    config = app[CONFIG]
    pool, catalog = app[UPSTREAMS], app[CATALOG]
    metrics.models = frozenset(name for name in (catalog.default_model, config.model, *config.models,
                                                 *catalog.allowed, *pool.named_models()) if name)
    sampler = asyncio.create_task(metrics.sample(pool.availability), name="metrics-sampler")
    runner: web.AppRunner | None = None
    assert config.metrics_listen is not None
    if not supervised():
        runner, url = await serve_metrics(config.metrics_listen, metrics.registry)
        metrics.url = url
        log.info("metrics on %s", url)
    try:
        yield
    finally:
        sampler.cancel()
        await asyncio.wait([sampler])
        if runner is not None:
            await runner.cleanup()
