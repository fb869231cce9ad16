"""Run the app on real sockets until SIGTERM or SIGINT, then shut down in order.

The sockets are systemd's when socket-activated (relay.socket), else our own TCP listener.
Under systemd (Type=notify) we say READY=1 once listening, ping the watchdog from the event
loop and say STOPPING=1 when shutdown begins.  ``shutdown()`` is the whole sequence, top to
bottom: stop accepting, let streams in flight finish up to the drain timeout, end the rest
with a retriable ``shutdown`` error (with a ``retry:`` hint, so clients come back), close.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from relay.extras import install_hint
from relay.aiohttp_internals import install_connection_hooks
from relay.config import Config
from relay.core.registry import Registry
from relay.http.app import make_app
from relay.http.appkeys import ACCESS, DISCONNECTS, METRICS, REGISTRY
from relay.http.client_errors import ClientErrorLog
from relay.run import systemd, worker as workers
from relay.run.worker import refuse_open_sockets
from relay.openfiles import open_files, raise_open_files
from relay.run.connections import ConnectionLimits, auto_total
from relay.run.deadlines import HeaderDeadline

log = logging.getLogger("relay")

#: How long aiohttp waits for each handler to send its last event once the streams are closed.
HANDLER_GRACE = 5.0


async def start(config: Config, sockets: Sequence[socket.socket] = ()) -> tuple[web.AppRunner, list[str]]:
    """Start serving on ``sockets`` (inherited, already listening) or on config.host:port."""
    app = make_app(config)
    worker = workers.worker_number()
    if worker is not None:
        async def name_worker(_request: web.Request, response: web.StreamResponse) -> None:
            response.headers["Relay-Worker"] = worker  # which process answered (--workers)
        app.on_response_prepare.append(name_worker)
    # aiohttp's run_app leaves handler cancellation off: without it a client that goes away
    # while the upstream is silent is only noticed at the next write, and the upstream bills on.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=HANDLER_GRACE,
                           logger=ClientErrorLog(logging.getLogger("aiohttp.server")),
                           keepalive_timeout=config.keepalive_idle)
    metrics = app[METRICS]
    await runner.setup()
    assert runner.server is not None
    deadline = HeaderDeadline(config.header_timeout, metrics, keepalive_idle=config.keepalive_idle)
    _, open_limit = open_files()
    total = config.max_connections or auto_total(open_limit)
    limits = ConnectionLimits(per_client=config.max_connections_per_client, total=total,
                              exempt=config.trust_proxy, metrics=metrics)
    # The one order (relay/aiohttp_internals.py): limits refuse before the deadline arms; a lost
    # connection leaves its stream before aiohttp cancels its handler.
    install_connection_hooks(runner.server, made=(limits.made, deadline.made), before_lost=(app[DISCONNECTS].lost,),
                             after_lost=(deadline.lost, limits.lost))
    sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in sockets]
    if not sites:
        sites.append(web.TCPSite(runner, config.host, config.port, backlog=config.backlog, reuse_address=True))
    try:
        for site in sites:
            await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"relay: error: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return runner, [_url(address) for address in runner.addresses]


def _url(sockname: Any) -> str:
    if isinstance(sockname, (str, bytes)):  # an AF_UNIX ListenStream= path
        return f"unix:{sockname!s}"
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Signals:
    """The first SIGTERM/SIGINT starts the shutdown; a second one cuts the drain short."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def received(self) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


async def serve(config: Config) -> None:
    try:
        sockets = workers.worker_socket() or systemd.listen_sockets()
    except ValueError as exc:
        raise SystemExit(f"relay: error: {exc}") from None
    refuse_open_sockets(config, sockets)
    soft, hard = raise_open_files()
    log.info("open-file limit %d (hard limit %d)", soft, hard)
    runner, urls = await start(config, sockets)
    where = ", ".join(urls) + ((" (from the supervisor)" if workers.worker_number() else " (socket-activated)") if sockets else "")
    loop_name = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    log.info("relay listening on %s%s (%s)", where, " (demo model)" if config.demo else "", loop_name)
    signals = _Signals()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.received)
    loop.add_signal_handler(signal.SIGHUP, reload, runner.app, where)
    interval = systemd.watchdog_interval()
    pings = asyncio.create_task(systemd.watchdog(interval), name="watchdog") if interval else None
    try:
        systemd.notify(f"READY=1\nSTATUS=listening on {where}")
        await signals.stop.wait()
        await shutdown(runner, config.drain_timeout, signals.hurry)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if runner.server is not None:  # shutdown() did not get to the end
            await runner.cleanup()
        if pings is not None:
            pings.cancel()
            await asyncio.wait([pings])


def reload(app: web.Application, where: str) -> None:
    """SIGHUP (``systemctl reload``): re-read the tokens file, following systemd's notify-reload protocol."""
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    app[ACCESS].reload()
    systemd.notify(f"READY=1\nSTATUS=listening on {where}")


async def shutdown(runner: web.AppRunner, drain_timeout: float, hurry: asyncio.Event) -> None:
    registry = runner.app[REGISTRY]
    running = len(registry.running())
    log.info("shutting down: draining %d streams for up to %g s", running, drain_timeout)
    systemd.notify(f"STOPPING=1\nSTATUS=draining {running} streams")
    # 1. Stop accepting.  Socket-activated, systemd still holds the listening socket: new
    #    connections wait in its queue for the next process instead of being refused.
    for site in list(runner.sites):
        await site.stop()
    # 2. Idle keep-alive connections close now and busy ones after their response, so no new
    #    request (no new stream) reaches this process.
    if runner.server is not None:
        runner.server.pre_shutdown()
    # 3. Generations in flight, /chat and /v1 alike, run on up to the drain timeout (or a
    #    second signal).
    await _drain(registry, drain_timeout, hurry)
    # 4. The app's on_shutdown hook ends the rest with a retriable "shutdown" error (retry: on
    #    /chat, 503 or an in-stream error on /v1), so clients come back; handlers send those
    #    last events (up to HANDLER_GRACE each); then the app closes.
    left = len(registry.running())
    if left:
        log.info("drain over: ending %d streams with a retriable shutdown error", left)
    await runner.cleanup()


async def _drain(registry: Registry, timeout: float, hurry: asyncio.Event) -> None:
    producers = [gen.task for gen in registry.running() if gen.task is not None]
    if not producers or timeout <= 0:
        return
    # asyncio.wait never cancels what it waits on, so leaving early leaves the streams running.
    all_done = asyncio.create_task(asyncio.wait(producers))
    hurried = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait([all_done, hurried], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        all_done.cancel()
        hurried.cancel()
        await asyncio.wait([all_done, hurried])


LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``--loop``: uvloop if asked for, or with ``auto`` if it is installed.

    uvloop is an optional extra (relay/extras.py): it cuts the relay's
    CPU per relayed event markedly (bench/RESULTS.md).  None means asyncio's own loop.
    """
    if choice not in LOOPS:
        raise ValueError(f"--loop must be one of {', '.join(LOOPS)}, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("relay: error: --loop uvloop, but uvloop is not installed: "
                             f"{install_hint('uvloop')}") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(config: Config, loop: str = "auto") -> int:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(serve(config))
    return 0
