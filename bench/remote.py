"""The `remote` phase: the relay where it is deployed, in front of a TLS model API across a network.

The fake upstream speaks TLS (a certificate from a throwaway CA made here with openssl) behind
bench/delayproxy.py, which adds a round trip (``--remote-rtt``, 40 ms by default) and counts
connections.  The same client (aiohttp, keep-alive, in this process) asks it directly, through
nginx (``proxy_pass https``, ``proxy_ssl_verify``, upstream keepalive and TLS session reuse) and
through the relay (and, with ``--compare-src DIR``, through another version of the relay, e.g.
the previous main), one after another in one run: answers of 20 and 300 tokens, one at a time
and 100 at once.  Figures: new upstream connections per answer after a warm-up (a new connection
is a TCP and a TLS handshake: about 1.7 round trips before the first token), time to first token
(p50/p99, and added over direct), CPU per answer of the relay and of nginx.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import wire
from bench.procs import REPO, Nginx, Relay, cpu_seconds, stop

FIRST_TOKEN = re.compile(rb'"content":"[^"]')
SCENARIOS = {  # name → (tokens, seconds between tokens, answers, at once)
    "seq-20": (20, 0.005, 20, 1),
    "seq-300": (300, 0.002, 10, 1),
    "conc-20": (20, 0.005, 300, 100),
    "conc-300": (300, 0.002, 300, 100),
}
QUICK_SCENARIOS = {"seq-20": (20, 0.005, 5, 1), "conc-20": (20, 0.005, 10, 10)}


def certificates(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (where / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    (where / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=bench CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
        str(cert), "-days", "2", "-extfile", str(where / "ext.cnf"))
    return ca, cert, key


class RemoteUpstream:
    """The TLS fake upstream behind the delaying, counting proxy."""

    def __init__(self, where: Path, rtt: float) -> None:
        self.ca, cert, key = certificates(where)
        self.upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", "0", "--tls-cert",
                                          str(cert), "--tls-key", str(key)], cwd=REPO, stdout=subprocess.PIPE,
                                         text=True)
        self.proxy: subprocess.Popen[str] | None = None
        self.counts = where / "connections"
        self.upstream_port = self._ready(self.upstream)
        self.proxy = subprocess.Popen([sys.executable, "-m", "bench.delayproxy", "--target-port",
                                       str(self.upstream_port), "--rtt", str(rtt), "--count-file", str(self.counts)],
                                      cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.port = self._ready(self.proxy)

    def _ready(self, proc: subprocess.Popen[str]) -> int:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"a remote-phase process did not start: {line!r}")
        return int(line.split()[1])

    def connections(self) -> int:
        return int(self.counts.read_text() or 0)

    def close(self) -> None:
        for proc in (self.proxy, self.upstream):
            if proc is not None:
                stop(proc)


async def _one(session: aiohttp.ClientSession, url: str, kind: str, key: str, n: int, dt: float) -> float:
    """One streamed answer, read to its end; the time to its first token, seconds."""
    body = wire.request_body(key, n, dt, openai=kind == "openai")
    began = time.perf_counter()
    ttft = -1.0
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for line in resp.content:
            if ttft < 0 and FIRST_TOKEN.search(line):
                ttft = time.perf_counter() - began
    if ttft < 0:
        raise RuntimeError(f"{url}: an answer without a token")
    return ttft


async def _scenario(url: str, kind: str, ssl_context: ssl.SSLContext | bool, n: int, dt: float, answers: int,
                    at_once: int, prefix: str, before: Any, after: Any) -> list[float]:
    """A warm-up round of ``at_once`` answers (every pool on the way grows to what the load needs),
    then ``answers`` measured ones, ``at_once`` at a time, all over one client session; ``before()``
    and ``after()`` bracket the measured part."""
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(_one(session, url, kind, f"{prefix}w{i}", n, dt) for i in range(at_once)))
        before()
        ttfts: list[float] = []
        for start in range(0, answers, at_once):
            batch = range(start, min(answers, start + at_once))
            ttfts += await asyncio.gather(*(_one(session, url, kind, f"{prefix}{i}", n, dt) for i in batch))
        after()
        return ttfts


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_remote(*, rtt: float, quick: bool, nginx_bin: str | None, relay_loop: str | None,
               compare_src: Path | None, relay_src: Path | None = None) -> dict[str, Any]:
    scenarios = QUICK_SCENARIOS if quick else SCENARIOS
    out: dict[str, Any] = {"rtt_ms": rtt * 1000, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        remote = RemoteUpstream(Path(tmp), rtt)
        try:
            direct_tls = ssl.create_default_context(cafile=str(remote.ca))
            upstream_url = f"https://127.0.0.1:{remote.port}/v1"
            targets: list[tuple[str, Any]] = [("direct", None), ("relay", relay_src)]
            if compare_src is not None:
                targets.append(("relay-before", compare_src))
            if nginx_bin is not None:
                targets.append(("nginx", None))
            for target, src in targets:
                proc: Relay | Nginx | None = None
                if target.startswith("relay"):
                    # SSL_CERT_FILE: the trust the operator adds, understood by every version compared.
                    proc = Relay(0, loop=relay_loop, src=src, upstream_url=upstream_url,
                                 extra_env={"SSL_CERT_FILE": str(remote.ca)})
                    url, kind, tls = f"http://127.0.0.1:{proc.port}/v1/chat/completions", "openai", False
                elif target == "nginx":
                    assert nginx_bin is not None
                    proc = Nginx(remote.port, nginx_bin, tls_ca=remote.ca)
                    url, kind, tls = f"http://127.0.0.1:{proc.port}/v1/chat/completions", "openai", False
                else:
                    url, kind, tls = upstream_url + "/chat/completions", "openai", direct_tls
                try:
                    for name, (n, dt, answers, at_once) in scenarios.items():
                        mark: dict[str, float] = {}

                        def before() -> None:
                            mark["conns"] = remote.connections()
                            mark["cpu"] = cpu_seconds(proc.pids) if proc is not None else 0.0

                        def after() -> None:
                            mark["conns"] = remote.connections() - mark["conns"]
                            mark["cpu"] = (cpu_seconds(proc.pids) if proc is not None else 0.0) - mark["cpu"]

                        ttfts = asyncio.run(_scenario(url, kind, tls, n, dt, answers, at_once, f"{name}-{target}-",
                                                      before, after))
                        row: dict[str, Any] = {
                            "answers": answers,
                            "new_connections_per_answer": round(mark["conns"] / answers, 3),
                            "ttft_ms": {"p50": round(statistics.median(ttfts) * 1000, 2),
                                        "p99": round(_pct(ttfts, 0.99) * 1000, 2)},
                        }
                        if proc is not None:
                            row["cpu_ms_per_answer"] = round(mark["cpu"] / answers * 1000, 3)
                        out["scenarios"].setdefault(name, {})[target] = row
                        print(f"  remote {name:>8} {target:>12}: {row}", flush=True)
                finally:
                    if proc is not None:
                        proc.close()
        finally:
            remote.close()
    for name, rows in out["scenarios"].items():
        direct = rows.get("direct")
        for target, row in rows.items():
            if direct is not None and target != "direct":
                row["added_ttft_ms"] = {q: round(row["ttft_ms"][q] - direct["ttft_ms"][q], 2) for q in ("p50", "p99")}
    return out
