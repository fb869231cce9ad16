"""``--redis local``: a private ``redis-server`` for one machine, started and stopped by the relay.

``relay serve --workers auto --redis local`` is the one command for scale-out on a single machine:
the supervisor starts ``redis-server`` (found on ``PATH``) on a unix socket in a directory of its
own (mode 0700, under ``$RUNTIME_DIRECTORY``, ``$XDG_RUNTIME_DIR`` or the temporary directory),
with no TCP port and no persistence, hands its URL to the workers through the environment, and
stops it by its PID when it stops.  The server dies with the relay even when the relay is killed
(``PR_SET_PDEATHSIG``).  Several machines share one Redis instead (docs/scale-out.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from relay.upstream.config import ConfigError

#: The environment variable through which workers (and the supervisor's own process) learn the URL.
URL_ENV: Final = "RELAY_LOCAL_REDIS_URL"
#: How long redis-server may take to answer its first PING.
START_TIMEOUT: Final = 10.0
PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class LocalRedis:
    """One private redis-server on a unix socket; ``url`` for the relay, ``stop()`` when done."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ConfigError("--redis local needs redis-server on PATH (Debian and Ubuntu: apt-get install "
                              "redis-server); or give --redis URL of a Redis you run")
        base = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-redis-", dir=base))
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--maxmemory-policy", "noeviction",
             "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"--redis local: redis-server exited at start (status {self.proc.returncode})")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.connect(str(self.socket))
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)  # a process starting: no event to wait on from here
        raise ConfigError(f"--redis local: redis-server did not answer within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        """Stop it by its PID and wait; remove its directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
