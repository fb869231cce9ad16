"""The systemd service protocol, a few lines each and no libsystemd.

- Notify (sd_notify(3)): one datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX
  socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names the abstract namespace.  The relay
  sends ``READY=1`` once it listens, ``STOPPING=1`` when shutdown begins and ``WATCHDOG=1``
  pings.  Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
- Watchdog (sd_watchdog_enabled(3)): ``$WATCHDOG_USEC`` is ``WatchdogSec=``; ``$WATCHDOG_PID``,
  when set, names the process it is meant for.  We ping at half the interval from a task on the
  event loop, so a loop stuck for a whole interval stops the pings and systemd restarts us.
- Socket activation (sd_listen_fds(3)): when ``$LISTEN_PID`` is our pid, ``$LISTEN_FDS``
  listening sockets start at fd 3.  systemd keeps its own copy, so while the relay restarts,
  connections wait in the kernel's accept queue instead of being refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("relay.systemd")

#: SD_LISTEN_FDS_START: the first inherited socket.
LISTEN_FDS_START = 3
#: A send to systemd's socket only blocks when systemd has stopped reading; give up rather than hang.
_NOTIFY_TIMEOUT = 1.0


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd or the send failed."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a kind of address (vsock) the relay never runs behind
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_NOTIFY_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when the watchdog is off."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2 / 1_000_000
    except ValueError:
        log.warning("ignoring a malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None


async def watchdog(interval: float, environ: Mapping[str, str] = os.environ) -> None:
    """Ping systemd every ``interval`` seconds until cancelled."""
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(interval)


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets systemd passed us, or [] when not socket-activated.

    The variables are removed either way (like ``sd_listen_fds(1)``), so nothing we might
    spawn mistakes the sockets for its own.
    """
    pid = environ.pop("LISTEN_PID", "")
    count = environ.pop("LISTEN_FDS", "")
    environ.pop("LISTEN_FDNAMES", None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process, e.g. a wrapper that exec'd us without updating it
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_PID={pid!r} / LISTEN_FDS={count!r} are not numbers") from None
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ValueError(f"fd {fd} from systemd is not a listening stream socket "
                             "(relay.socket needs ListenStream= and Accept=no)")
        sockets.append(sock)
    return sockets
