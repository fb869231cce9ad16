"""``relay serve --workers N``: a small supervisor and N worker processes on one listening socket.

The supervisor binds the socket (or takes systemd's) and hands it to each worker explicitly
(systemd's fd is not inheritable).  Each worker is ``python -m relay`` with the same arguments,
started in its own session (a terminal's Ctrl-C reaches only the supervisor, which forwards
it once) and told to die with its parent.  Workers speak the sd_notify protocol to the
supervisor, on one socket each, exactly as they would to systemd; the supervisor alone talks to
systemd (``NotifyAccess=main``): ``READY=1`` once every worker listens, ``WATCHDOG=1`` while the
supervisor's own loop runs, ``STOPPING=1`` on the way out.

- Heartbeats: each worker pings the supervisor (``WATCHDOG=1``) at a quarter of
  ``--worker-timeout``, from its event loop; one silent for the whole timeout is stuck (a
  blocking call, a livelock, SIGSTOP) and is killed and replaced, as gunicorn's arbiter does,
  while the others go on serving.  A stuck worker never costs the other workers' streams a
  restart of the whole service.

- A worker that exits unexpectedly is logged and replaced; one that keeps dying before it is
  ready backs off (0.1 s doubling to 5 s) and after ``CRASH_LIMIT`` in a row the supervisor
  stops the rest and exits 1 (systemd's restart policy takes it from there).
- ``--metrics-listen``: the supervisor serves it; each worker writes its values to files in a
  directory of the supervisor's (``prometheus-client``'s multiprocess mode), one scrape merges
  them, and a dead worker's live gauges are dropped when it is replaced.
- SIGTERM/SIGINT: forwarded to every worker, which drains (relay/run/server.py); a second one
  is forwarded too and cuts the drains short.  SIGHUP: forwarded, every worker re-reads the
  tokens file; no worker restarts, so no stream is cut by a reload.

Why not gunicorn's aiohttp worker: it leaves handler cancellation off, restarts workers on
SIGHUP (cutting streams) and skips the relay's own drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from relay.config import Config
from relay.run import systemd
from relay.run.worker import SUPERVISOR_ENV, WORKER_ENV, WORKER_FD_ENV, refuse_open_sockets

log = logging.getLogger("relay.workers")

CRASH_LIMIT: Final = 5
BACKOFF_MAX: Final = 5.0
@dataclass
class _Worker:
    number: int
    proc: asyncio.subprocess.Process | None = None
    notify: socket.socket | None = None
    address: str = ""
    ready: bool = False
    last_ping: float = 0.0
    started: float = 0.0
    reader: asyncio.Task[None] | None = None
    failures: int = 0
    #: Killed for missing its heartbeat (replaced as a worker that died after it was ready).
    stuck: bool = False
    messages: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str], sockets: list[socket.socket]) -> None:
        self.config = config
        self.argv = list(argv)
        self.sockets = sockets
        self.workers = [_Worker(n) for n in range(1, config.workers + 1)]
        self.stopping = False
        self.signals = 0
        self.changed = asyncio.Event()
        self.watchdog = systemd.watchdog_interval()
        self.where = ""
        #: The workers' metric value files (--metrics-listen), served merged by this process.
        self.metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-") if config.metrics_listen else None

    async def _spawn(self, worker: _Worker) -> None:
        name = f"relay-worker-{os.getpid()}-{worker.number}-{secrets.token_hex(4)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("\0" + name)
        sock.setblocking(False)
        worker.notify, worker.address, worker.ready = sock, "@" + name, False
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID",
                            "WATCHDOG_USEC")}
        fds = tuple(sock.fileno() for sock in self.sockets)
        env.update({WORKER_ENV: str(worker.number), WORKER_FD_ENV: ",".join(map(str, fds)),
                    SUPERVISOR_ENV: str(os.getpid()), "NOTIFY_SOCKET": worker.address})
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metrics_dir is not None:
            env.update({"PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, "RELAY_METRICS_SUPERVISED": "1"})
        # The worker's heartbeat: sd_notify's WATCHDOG=1 to us, at half this (a quarter of
        # --worker-timeout), whether or not systemd watches the supervisor.
        env["WATCHDOG_USEC"] = str(int(self.config.worker_timeout / 2 * 1_000_000))
        worker.started = time.monotonic()
        worker.last_ping = worker.started
        worker.stuck = False
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", *self.argv, env=env, pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        worker.reader = asyncio.create_task(self._read(worker), name=f"worker-{worker.number}-notify")
        log.info("worker %d started (pid %d)", worker.number, worker.proc.pid)

    async def _read(self, worker: _Worker) -> None:
        assert worker.notify is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(worker.notify, 4096)
            message = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)
            worker.last_ping = time.monotonic()
            if message.get("READY") == "1" and not worker.ready:
                worker.ready = True
                worker.failures = 0
                if "STATUS" in message:
                    self.where = message["STATUS"].replace("listening on ", "", 1).split(" (")[0]
                self.changed.set()

    def _close_notify(self, worker: _Worker) -> None:
        if worker.reader is not None:
            worker.reader.cancel()
        if worker.notify is not None:
            worker.notify.close()
            worker.notify = None

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                try:
                    worker.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            self._forward(signal.SIGHUP)
            systemd.notify(f"READY=1\nSTATUS={self._status()}")
            return
        self.signals += 1
        if not self.stopping:
            self.stopping = True
            running = sum(1 for w in self.workers if w.proc is not None and w.proc.returncode is None)
            log.info("shutting down: %d workers draining", running)
            systemd.notify(f"STOPPING=1\nSTATUS=draining {running} workers")
        self._forward(signal.SIGTERM)
        self.changed.set()

    def _status(self) -> str:
        return f"listening on {self.where} ({len(self.workers)} workers)"

    async def run(self) -> int:
        metrics = await self._serve_metrics()
        try:
            return await self._run()
        finally:
            if metrics is not None:
                await metrics.cleanup()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _serve_metrics(self) -> web.AppRunner | None:
        if self.metrics_dir is None or self.config.metrics_listen is None:
            return None
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from relay.http.metrics_listener import serve_metrics

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        runner, url = await serve_metrics(self.config.metrics_listen, registry)
        log.info("metrics of every worker on %s", url)
        return runner

    def _dead(self, pid: int) -> None:
        """A worker is gone: its live gauges leave the merge (its counters stay, so no total goes back)."""
        if self.metrics_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signal, sig)
        for worker in self.workers:
            await self._spawn(worker)
        announced = False
        pinger = asyncio.create_task(self._watchdog(), name="watchdog") if self.watchdog else None
        heartbeats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        try:
            while True:
                if not announced and not self.stopping and all(w.ready for w in self.workers):
                    announced = True
                    log.info("all %d workers listen on %s", len(self.workers), self.where)
                    systemd.notify(f"READY=1\nSTATUS={self._status()}")
                exits = [asyncio.create_task(w.proc.wait()) for w in self.workers
                         if w.proc is not None and w.proc.returncode is None]
                if not exits:
                    break
                changed = asyncio.create_task(self.changed.wait())
                await asyncio.wait([*exits, changed], return_when=asyncio.FIRST_COMPLETED)
                for task in (*exits, changed):
                    task.cancel()
                self.changed.clear()
                for worker in self.workers:
                    proc = worker.proc
                    if proc is None or proc.returncode is None:
                        continue
                    self._close_notify(worker)
                    worker.proc = None
                    self._dead(proc.pid)
                    if self.stopping:
                        log.info("worker %d (pid %d) exited with status %d", worker.number, proc.pid,
                                 proc.returncode)
                        continue
                    if not announced:
                        # Dead before the relay ever served (bad settings, Redis unreachable): every
                        # worker would do the same, so stop now with its status and its one line.
                        log.error("worker %d exited with status %d before the relay was ready",
                                  worker.number, proc.returncode)
                        self.stopping = True
                        self._forward(signal.SIGTERM)
                        return proc.returncode if proc.returncode > 0 else 1
                    if not await self._replace(worker, proc):
                        return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if pinger is not None:
                pinger.cancel()
            heartbeats.cancel()
            await self._stop_all()
        return 0

    async def _replace(self, worker: _Worker, proc: asyncio.subprocess.Process) -> bool:
        ready = worker.ready
        worker.failures = 0 if ready else worker.failures + 1
        if worker.stuck:
            log.error("worker %d (pid %d) was killed for missing its heartbeat; starting another", worker.number,
                      proc.pid)
        else:
            log.error("worker %d (pid %d) exited unexpectedly with status %d; starting another", worker.number,
                      proc.pid, proc.returncode)
        if worker.failures >= CRASH_LIMIT:
            log.error("worker %d died %d times in a row before it was ready: giving up", worker.number,
                      worker.failures)
            self.stopping = True
            self._forward(signal.SIGTERM)
            return False
        if worker.failures:
            await asyncio.sleep(min(BACKOFF_MAX, 0.1 * 2 ** (worker.failures - 1)))
        if self.stopping:
            return True
        await self._spawn(worker)
        return True

    async def _watchdog(self) -> None:
        """systemd's watchdog is fed while this loop runs: a stuck worker is replaced (``_heartbeats``),
        so only a supervisor that stopped itself gets the whole service restarted."""
        assert self.watchdog is not None
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)

    async def _heartbeats(self) -> None:
        """Kill a worker whose heartbeat is older than --worker-timeout (its loop is stuck: a
        blocking call, a livelock, SIGSTOP); the main loop then replaces it like any dead worker.
        The heartbeat is its own sd_notify ping, so a worker busy but answering is never killed."""
        timeout = self.config.worker_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))
            now = time.monotonic()
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.returncode is not None or self.stopping or worker.stuck:
                    continue
                # Before it is ready a worker may be starting slowly (imports, Redis): the start
                # gets a minute at least; a worker that never gets there is replaced too.
                if now - worker.last_ping >= (timeout if worker.ready else max(timeout, 60.0)):
                    worker.stuck = True
                    log.error("worker %d (pid %d) missed its heartbeat for %.3g s (--worker-timeout): killing "
                              "and replacing it; the other workers go on", worker.number, proc.pid, now - worker.last_ping)
                    try:
                        proc.kill()  # SIGKILL: works on a stopped process too
                    except ProcessLookupError:
                        pass

    async def _stop_all(self) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if procs:
            await asyncio.gather(*(proc.wait() for proc in procs))
        for worker in self.workers:
            self._close_notify(worker)


def listen(config: Config) -> list[socket.socket]:
    """systemd's listening sockets, else one bound here on --host/--port."""
    try:
        sockets = systemd.listen_sockets()
    except ValueError as exc:
        raise SystemExit(f"relay: error: {exc}") from None
    if sockets:
        return sockets
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"relay: error: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    sock.listen(config.backlog)
    return [sock]


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run ``config.workers`` workers until SIGTERM; the exit status."""
    sockets = listen(config)
    refuse_open_sockets(config, sockets)
    log.info("starting %d workers", config.workers)
    return asyncio.run(Supervisor(config, argv, sockets).run())
