"""Two versions of the relay, side by side: on-CPU time per relayed event, rounds alternating.

    python -m bench.abcpu DIR_A DIR_B [--tls] [--rounds 8]

Each DIR holds a ``relay`` package (``git archive REV relay | tar -x -C DIR``).  Both relays run
at once in front of one fake upstream, and each round streams answers of 300 tokens one at a
time through A, then through B, so a drift of the machine's speed lands on both.  The figure is
the relay's on-CPU time per event from ``/proc/<pid>/task/*/schedstat`` (nanoseconds), not
``/proc/<pid>/stat``'s 10 ms ticks, which round a phase of a few hundred milliseconds by several
per cent.  ``--tls``: the upstream speaks TLS behind a 40 ms round trip (bench/remote.py), where
the relay is deployed; else plain HTTP on loopback.  Compare the medians; the spread of the rounds
of one version is the noise.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import wire
from bench.procs import Relay, Upstream
from bench.remote import RemoteUpstream, _scenario

TOKENS = 300
ANSWERS = 5


def on_cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                total += int(Path(path).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
    return total


async def _answers(port: int, count: int, dt: float) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            body = wire.request_body(f"ab-{time.monotonic_ns()}", TOKENS, dt, openai=True)
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                async for _ in resp.content.iter_any():
                    pass


def _round(relay: Relay, count: int, tls: bool) -> float:
    """Stream ``count`` answers one at a time through ``relay``: its on-CPU µs per event."""
    before = on_cpu_ns(relay.pids)
    if tls:
        asyncio.run(_scenario(f"http://127.0.0.1:{relay.port}/v1/chat/completions", "openai", False, TOKENS, 0.002,
                              count, 1, f"ab-{time.monotonic_ns()}-", lambda: None, lambda: None))
    else:
        asyncio.run(_answers(relay.port, count, 0.001))
    return (on_cpu_ns(relay.pids) - before) / (count * TOKENS) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.abcpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs=2, metavar="DIR")
    parser.add_argument("--tls", action="store_true", help="a TLS upstream behind a 40 ms round trip")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        upstream: RemoteUpstream | Upstream = RemoteUpstream(Path(tmp), 0.04) if args.tls else Upstream()
        relays: dict[Path, Relay] = {}
        try:
            for src in args.dirs:
                if args.tls:
                    assert isinstance(upstream, RemoteUpstream)
                    relays[src] = Relay(0, src=src, upstream_url=f"https://127.0.0.1:{upstream.port}/v1",
                                        extra_env={"SSL_CERT_FILE": str(upstream.ca)})
                else:
                    relays[src] = Relay(upstream.port, src=src)
            for relay in relays.values():
                _round(relay, 2, args.tls)  # warm: connections pooled, code paths compiled
            figures: dict[Path, list[float]] = {src: [] for src in relays}
            for _ in range(args.rounds):
                for src, relay in relays.items():
                    figures[src].append(_round(relay, ANSWERS, args.tls))
            for src, values in figures.items():
                ordered = sorted(values)
                print(f"{src}: µs per event {' '.join(f'{v:.1f}' for v in values)}; median "
                      f"{ordered[len(ordered) // 2]:.1f}, least {ordered[0]:.1f}")
        finally:
            for relay in relays.values():
                relay.close()
            upstream.close()


if __name__ == "__main__":
    main()
