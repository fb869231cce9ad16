"""Helpers for tests that run `relay serve` as a real process, the way systemd runs it.

- ``NotifyListener``: a real AF_UNIX datagram socket given to the child as ``$NOTIFY_SOCKET``.
- ``spawn_relay``: ``python -m relay serve`` through a tiny exec wrapper that sets the variables
  systemd sets to the *child's* pid (``LISTEN_PID``, ``WATCHDOG_PID``: only known after the
  fork) and puts an inherited listening socket at fd 3, exactly as socket activation does.
  The child is always killed and reaped on the way out.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import TEST_KEY, FakeUpstream, chunk, sse

REPO = Path(__file__).resolve().parent.parent

# Runs in the child before the relay: the pid variables name the process that will be the
# relay (exec keeps the pid), and dup2 puts the inherited socket where sd_listen_fds looks.
_WRAPPER = """\
import os, sys
pid = str(os.getpid())
for name in filter(None, os.environ.pop("TEST_PID_VARS", "").split(",")):
    os.environ[name] = pid
fd = os.environ.pop("TEST_LISTEN_FD", "")
if fd:
    if int(fd) != 3:
        os.dup2(int(fd), 3)
        os.close(int(fd))
    os.environ["LISTEN_FDS"] = "1"
nofile = os.environ.pop("TEST_NOFILE", "")
if nofile:  # start with a low soft open-file limit (the relay raises it itself)
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
os.execv(sys.executable, [sys.executable, "-m", "relay", *sys.argv[1:]])
"""

# Variables of the test's own environment that would change what the child does.
_SCRUB = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
          "OPENAI_API_KEY", "OPENAI_BASE_URL", "CREDENTIALS_DIRECTORY", "PROMETHEUS_MULTIPROC_DIR")


class NotifyListener:
    """systemd's side of sd_notify: receives the child's datagrams as ``{KEY: VALUE}`` dicts."""

    def __init__(self) -> None:
        # Abstract namespace ("@" in $NOTIFY_SOCKET): no path-length limit, nothing to clean up.
        self.name = f"relay-test-{secrets.token_hex(8)}"
        self.address = "@" + self.name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)
        self.seen: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append(message)
        return message

    async def until(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next message that carries ``key`` (bounded, so a missing one fails instead of hanging)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next()
                if key in message:
                    return message

    def close(self) -> None:
        self.sock.close()


def listening_socket() -> socket.socket:
    """A loopback listening socket, as relay.socket would create it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def port_of(message: dict[str, str]) -> int:
    """The port in READY's ``STATUS=listening on http://127.0.0.1:PORT/``."""
    url = message["STATUS"].split("listening on ", 1)[1].split()[0]
    return int(url.rstrip("/").rsplit(":", 1)[1])


async def stop_group(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group, and wait.

    ``sig`` first (the graceful stop); whatever is still alive after ``timeout`` is killed.
    Returns once the leader is reaped and no process of the group is left.
    """
    pgid = proc.pid

    def signal_group(s: int) -> bool:
        try:
            os.killpg(pgid, s)
        except ProcessLookupError:
            return False
        return True

    signal_group(sig)
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
            while signal_group(0):  # the leader's children may outlive it by a moment
                await asyncio.sleep(0.02)
    except TimeoutError:
        signal_group(signal.SIGKILL)
        await proc.wait()
        async with asyncio.timeout(timeout):
            while signal_group(0):
                await asyncio.sleep(0.02)


@dataclass
class Relay:
    proc: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exit_status(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


@asynccontextmanager
async def spawn_relay(tmp: Path, upstream: FakeUpstream, *args: str, notify: NotifyListener | None = None,
                      listen: socket.socket | None = None, env: dict[str, str] | None = None,
                      pid_vars: tuple[str, ...] = ()) -> AsyncIterator[Relay]:
    environ = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("RELAY_")}
    environ.update({"OPENAI_API_KEY": TEST_KEY, "PYTHONUNBUFFERED": "1"})
    if notify is not None:
        environ["NOTIFY_SOCKET"] = notify.address
    pass_fds: tuple[int, ...] = ()
    if listen is not None:
        environ["TEST_LISTEN_FD"] = str(listen.fileno())
        pass_fds = (listen.fileno(),)
        pid_vars = (*pid_vars, "LISTEN_PID")
    environ["TEST_PID_VARS"] = ",".join(pid_vars)
    environ.update(env or {})
    log = tmp / f"relay-{secrets.token_hex(4)}.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRAPPER, "serve", "--upstream", upstream.base_url, "--model", "fake-model",
            "--host", "127.0.0.1", "--port", "0", "--log-level", "debug", *args,
            env=environ, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=pass_fds)
    relay = Relay(proc, log)
    try:
        yield relay
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


Behaviour = Callable[[web.Request, FakeUpstream], Any]


def first_delta_then_wait(gates: dict[str, asyncio.Event], *, seen: list[str] | None = None) -> Behaviour:
    """An upstream that sends the prompt back as one delta, then waits for ``gates[prompt]`` before finishing.

    The pause is an event the test sets (order, not timing).  ``seen`` collects the prompts.
    """
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        prompt = (await request.json())["messages"][-1]["content"]  # aiohttp keeps the body
        if seen is not None:
            seen.append(prompt)
        resp = await fake.start_stream(request)
        await fake.send(resp, sse(chunk("", role="assistant")))
        await fake.send(resp, sse(chunk(prompt)))
        await gates.setdefault(prompt, asyncio.Event()).wait()
        await fake.send(resp, sse(chunk(" done", finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp
    return run


def run_bench(*args: str, out: Path, timeout: float) -> dict[str, Any]:
    """``python -m bench.run ARGS --out OUT``, which must succeed within ``timeout``; its report.

    Its own session: on a timeout the whole group goes (the bench's relays, nginx, redis-server
    hold the pipes; killing the leader alone would leave communicate() waiting on them).
    """
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench.run {' '.join(args)} took over {timeout:g} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return report
