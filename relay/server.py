"""Run the app on a real socket until SIGTERM or SIGINT, then shut down in order.

Shutdown reads top to bottom: stop accepting; cancel running streams with a retriable
``shutdown`` error (so EventSource clients come back); give handlers a moment to send it;
close the rest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from relay.app import make_app
from relay.config import Config

log = logging.getLogger("relay")


async def start(config: Config) -> tuple[web.AppRunner, list[str]]:
    """Start listening; returns the runner and the URLs it listens on."""
    app = make_app(config)
    # aiohttp's run_app leaves handler cancellation off: without it a client that goes away
    # while the upstream is silent is only noticed at the next write, and the upstream bills on.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=config.backlog, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"relay: error: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    urls = [_url(address) for address in runner.addresses]
    return runner, urls


def _url(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve(config: Config) -> None:
    runner, urls = await start(config)
    log.info("relay listening on %s%s", ", ".join(urls), " (demo model)" if config.demo else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run(config: Config) -> int:
    asyncio.run(serve(config))
    return 0
