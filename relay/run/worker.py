"""The worker side of ``relay serve --workers N`` (the supervisor is relay/run/workers.py), and the
check both a worker and a single process make of sockets they did not bind.

A worker learns from its environment that it is one (its number), which listening sockets the
supervisor handed it, and promises to die with the supervisor.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Sequence
from typing import Final

from relay.config import Config
from relay.validation import is_loopback

#: Environment a worker gets: its number, the listening socket's fd, the supervisor's pid.
WORKER_ENV: Final = "RELAY_WORKER"
WORKER_FD_ENV: Final = "RELAY_WORKER_FD"
SUPERVISOR_ENV: Final = "RELAY_SUPERVISOR_PID"
PR_SET_PDEATHSIG: Final = 1


def worker_number(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """This process's worker number when a supervisor started it, else None."""
    return environ.get(WORKER_ENV) or None


def worker_socket(environ: os._Environ[str] = os.environ) -> list[socket.socket]:
    """The listening sockets the supervisor handed down (and the promise to die with it)."""
    fds = environ.pop(WORKER_FD_ENV, "")
    parent = environ.pop(SUPERVISOR_ENV, "")
    if not fds:
        return []
    _die_with_parent(int(parent) if parent.isdigit() else None)
    sockets = []
    for fd in fds.split(","):
        os.set_inheritable(int(fd), False)
        sockets.append(socket.socket(fileno=int(fd)))
    return sockets


def _die_with_parent(parent: int | None) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before we could ask


def refuse_open_sockets(config: Config, sockets: Sequence[socket.socket]) -> None:
    """The --host check of config.py, for sockets systemd hands us (their address is not --host)."""
    if config.tokens_file is not None or config.allow_anonymous:
        return
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(sock.getsockname()[0]):
            raise SystemExit(f"relay: error: refusing to serve the inherited socket on {sock.getsockname()[0]} "
                             "without access control: give --tokens-file FILE, or --allow-anonymous if something "
                             "else guards the relay")
