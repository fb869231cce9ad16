"""A real Redis for tests: Debian's ``redis-server``, on a temporary unix socket or a loopback port.

Started with no persistence and stopped by its PID (and reaped) on the way out, so nothing
outlives the test.  ``restart()`` stops it and starts a new, empty one at the same address: what
a Redis without persistence looks like after a crash.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, workdir: Path, *, unix: bool = True, extra: tuple[str, ...] = (),
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.unix = unix
        self.extra = extra
        self.tls = tls
        self.socket_path = workdir / "redis.sock"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        if self.unix:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [REDIS_SERVER, "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--bind", "127.0.0.1", "--logfile", str(self.log), "--daemonize", "no"]
        if self.tls is not None:
            ca, cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        elif self.unix:
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen([*args, *self.extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        await self._until_ready()

    async def _until_ready(self) -> None:
        async with asyncio.timeout(20):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text(errors='replace')[-2000:]}")
                if self._answers():
                    return
                await asyncio.sleep(0.02)

    def _answers(self) -> bool:
        try:
            if self.unix and self.tls is None:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(self.socket_path))
                    sock.sendall(b"PING\r\n")
                    return sock.recv(64).startswith(b"+PONG")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                # TLS: the port accepting is enough (the handshake is the client's business).
                return True if self.tls is not None else self._ping_tcp()
        except OSError:
            return False

    def _ping_tcp(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    async def restart(self) -> None:
        await self.stop()
        if self.socket_path.exists():
            self.socket_path.unlink()
        await self.start()


@asynccontextmanager
async def redis_server(workdir: Path, **kwargs: object) -> AsyncIterator[RedisServer]:
    server = RedisServer(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


class RedisCluster:
    """A real Redis Cluster: three masters with a replica each, Debian's ``redis-server`` on loopback
    ports, created with ``redis-cli --cluster create``; every node stopped by its PID at the end."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.nodes = [RedisServer(workdir / f"node{i}", unix=False,
                                  extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                         "--cluster-node-timeout", "1000",
                                         # its bus on a port of its own (not port + 10000, which
                                         # may not exist for an ephemeral port)
                                         "--cluster-port", str(free_port())))
                      for i in range(masters * 2)]
        self.masters = masters

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    async def start(self) -> None:
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.log = node.workdir / "redis.log"
            await node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        proc = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "1",
            "--cluster-yes", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.decode(errors='replace')[-2000:]}")
        async with asyncio.timeout(30):
            while not all(self._ok(n) for n in self.nodes):
                await asyncio.sleep(0.05)

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        """The node sees the cluster whole and, a replica, has synced with its master (a replica
        that never synced would never be promoted: its data counts as too old)."""
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=1) as sock:
                sock.sendall(b"CLUSTER INFO\r\n")
                if b"cluster_state:ok" not in sock.recv(4096):
                    return False
                sock.sendall(b"INFO replication\r\n")
                info = sock.recv(8192)
                return b"role:master" in info or b"master_link_status:up" in info
        except OSError:
            return False

    async def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        from redis.asyncio.cluster import RedisCluster as Client

        alive = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        client = Client(host="127.0.0.1", port=alive.port)
        try:
            await client.initialize()
            node = client.get_node_from_key(key)
        finally:
            await client.aclose()
        return next(n for n in self.nodes if n.port == node.port)

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()


@asynccontextmanager
async def redis_cluster(workdir: Path) -> AsyncIterator[RedisCluster]:
    cluster = RedisCluster(workdir)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
