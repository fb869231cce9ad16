"""Processes of the benchmark: the fake upstream, the relay, nginx; their CPU and memory from /proc."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Soft open-files limit up to the hard one (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def use_fast_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run the harness's own processes on uvloop when installed: they must stay lean."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def free_port() -> int:
    """A loopback port free now, for a server process that will bind it in a moment.

    Chosen below the kernel's ephemeral range: a port from inside it (what binding port 0 gives)
    can be taken, between this check and the server's bind, by any outgoing connection of the
    thousands the harness and the relay open.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 10000 if ephemeral_low > 11000 else 1024
    for _ in range(200):
        port = random.randrange(low, ephemeral_low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between {low} and {ephemeral_low}")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_workers(port: int, count: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Until every worker has answered (the supervisor's socket accepts before they listen)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"only workers {sorted(seen)} of {count} answered")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # a new connection each time
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            seen.add(resp.getheader("Relay-Worker") or "?")
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()


class Redis:
    """Debian's redis-server on a temporary unix socket, for the Redis phases."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.socket = self.dir / "redis.sock"
        self.proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        self.url = f"unix://{self.socket}"
        self.pids = [self.proc.pid]

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Upstream:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", "0"], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            stop(self.proc)
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        self.pids = [self.proc.pid]

    def close(self) -> None:
        stop(self.proc)


class Relay:
    """``python -m relay serve`` against the fake upstream, one process."""

    def __init__(self, upstream_port: int, *, loop: str | None = None, extra: tuple[str, ...] = (),
                 src: Path | None = None, config: Path | None = None, workers: int = 1,
                 upstream_url: str | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        # ``config``: a TOML file with [[upstreams]] instead of the one --upstream.
        url = upstream_url or f"http://127.0.0.1:{upstream_port}/v1"
        where = ["--config", str(config)] if config else ["--upstream", url]
        args = [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                *where, "--model", "bench",
                "--max-streams", "100000", "--pool-limit", "100000", "--resume-grace", "0",
                "--log-level", "warning", *extra]
        if loop:
            args += ["--loop", loop]
        # One load generator on 127.0.0.1 is one "client" to the access limits: lift them.
        args += ["--rate-limit", "0", "--max-streams-per-client", "1000000", "--max-connections-per-client", "1000000"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_"))}
        env["OPENAI_API_KEY"] = "sk-bench-not-a-key"
        env.update(extra_env or {})
        # ``src``: a directory holding another version of the relay package (e.g. ``git archive``).
        if workers > 1:
            args += ["--workers", str(workers)]
        self.proc = subprocess.Popen(args, cwd=src or REPO, env=env)
        wait_port(self.port, self.proc)
        if workers > 1:
            wait_workers(self.port, workers, self.proc)
        # With --workers, the supervisor and its workers (whose CPU is the relay's).
        self.pids = [self.proc.pid, *children(self.proc.pid)]

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
            return body

    def close(self) -> None:
        stop(self.proc)


NGINX_CONF = """\
{user}worker_processes 1;
worker_rlimit_nofile {nofile};
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections {conns}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://fake;{tls}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


class Nginx:
    """nginx, one worker, proxy_pass with proxy_buffering off, to the same fake upstream."""

    def __init__(self, upstream_port: int, binary: str, *, tls_ca: Path | None = None) -> None:
        """``tls_ca``: the upstream speaks TLS, verified against this CA (the remote phase)."""
        self.dir = tempfile.TemporaryDirectory(prefix="bench-nginx-")
        prefix = Path(self.dir.name)
        self.port = free_port()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(NGINX_CONF.format(
            user=user, nofile=nofile, prefix=prefix, conns=max(nofile - 64, 1024), upstream=upstream_port,
            port=self.port, scheme="https" if tls_ca else "http",
            tls=(f"\n            proxy_ssl_trusted_certificate {tls_ca};\n            proxy_ssl_verify on;"
                 "\n            proxy_ssl_name 127.0.0.1;\n            proxy_ssl_session_reuse on;") if tls_ca else ""))
        self.proc = subprocess.Popen([binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
                                      "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        deadline = time.monotonic() + 5
        while not children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.pids = [self.proc.pid, *children(self.proc.pid)]

    def close(self) -> None:
        stop(self.proc)
        self.dir.cleanup()
