"""A TCP forwarder that delays each direction by half a round trip and counts connections.

It stands for the network between the relay and a remote model API: what crosses it (TLS
included, end to end: it only moves bytes) arrives ``--rtt``/2 later in each direction, as it
would across a real link, and every new connection (a TCP and a TLS handshake to pay) is counted.

    python -m bench.delayproxy --target-port P --rtt 0.04 --count-file F   # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench.procs import raise_nofile, use_fast_loop


class Half(asyncio.Protocol):
    """One direction's receiving side: what it reads is written to ``peer`` ``delay`` later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.peer: Half | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.loop.call_later(self.delay, self._forward, data)

    def _forward(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.loop.call_later(self.delay, self._close_peer)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.loop.call_later(self.delay, self._close_peer)

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(target_port: int, rtt: float, count_file: Path) -> None:
    loop = asyncio.get_running_loop()
    count = 0

    class Front(Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal count
            super().connection_made(transport)
            count += 1
            count_file.write_text(str(count))
            transport.pause_reading()  # until the far side is connected
            loop.create_task(self._connect())

        async def _connect(self) -> None:
            try:
                _, back = await loop.create_connection(lambda: Half(rtt / 2), "127.0.0.1", target_port)
            except OSError:
                if self.transport is not None:
                    self.transport.close()
                return
            back.peer, self.peer = self, back
            if self.transport is not None:
                self.transport.resume_reading()

    server = await loop.create_server(lambda: Front(rtt / 2), "127.0.0.1", 0, backlog=4096)
    count_file.write_text("0")
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delayproxy")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--rtt", type=float, default=0.04, help="round trip added, seconds")
    parser.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args(argv)
    raise_nofile()
    try:
        use_fast_loop(lambda: serve(args.target_port, args.rtt, args.count_file))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
