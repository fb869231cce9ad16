"""The benchmark: the relay against direct and nginx, side by side, in one run on this machine.

    python -m bench.run            # the full run (about 6-8 minutes on 2 cores)
    python -m bench.run --quick    # a smoke run of seconds: every figure, tiny loads

Every process has its own event loop: the fake upstream (bench/upstream.py), the relay
(``python -m relay serve``), nginx (one worker) and the load generator (bench/loadgen.py),
which checks every stream's bytes.  CPU comes from /proc/<pid>/stat, so the load generator's
speed does not enter the relay's figure.  Prints a table; writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import (REPO, Nginx, Redis, Relay, Upstream, cpu_seconds, free_port, nginx_binary, raise_nofile,
                         rss_kib)
from bench.wire import request_body

OUT = REPO / "bench" / "out"
TARGETS = {  # name → (path, kind)
    "direct": ("/v1/chat/completions", "openai"),
    "nginx": ("/v1/chat/completions", "openai"),
    "chat": ("/chat", "chat"),
    "v1": ("/v1/chat/completions", "openai"),
    "responses": ("/v1/responses", "responses"),
}

FULL: dict[str, Any] = {
    "cpu": dict(streams=200, n=150, dt=0.04, ramp=1.0),
    "cpulight": dict(streams=50, n=150, dt=0.1, ramp=1.0),
    # N concurrent: 2N streams of 5 s start evenly over 10 s; the TTFT counted is that of the
    # streams started in the second half, when N others are in flight (steady state, not a burst).
    "ttft": [dict(streams=200, n=50, dt=0.1, ramp=10.0, ttft_from=5.0, concurrent=100),
             dict(streams=2000, n=50, dt=0.1, ramp=10.0, ttft_from=5.0, concurrent=1000)],
    "rates": [2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 16000, 20000],
    "rate_streams": 500, "rate_seconds": 4.0, "rate_ramp": 1.0,
    "disconnect": dict(streams=200, n=400, dt=0.05, ramp=1.0, close_after=[1, 20]),
    "silent": dict(streams=100, ramp=2.0),
    "rss": dict(streams=5000, n=100, dt=10.0, ramp=3.0),
    "warmup": dict(streams=200, n=5, dt=0.01, ramp=0.5),
    "concurrency": [2000, 4000, 8000, 9500],
    "concurrency_stream": dict(n=20, dt=1.0),
    "failover": dict(streams=400, n=5, dt=0.02, ramp=4.0),
    # 300 readers that never read, each on a 200-token/s upstream answer of 30 s; the healthy
    # streams start once the stalled ones have had 24 s to fill every buffer in their way.  The
    # fake upstream's send buffer for those answers is 64 KiB (the kernel's autotuning would let it
    # fill MiBs, burning a core of this machine for minutes): it then waits, as TCP makes a real
    # upstream wait, and what is measured is the relay beside stalled streams, not the fake's writes.
    "stalled": dict(stalled=300, stalled_n=6000, stalled_dt=0.005, settle=24.0, rounds=5, sndbuf=65536,
                    healthy=dict(streams=20, n=20, dt=0.05, ramp=0.5)),
    "redis_rate": 5000,
    # N streams that disconnect together: every one open with its first token, then all closed in
    # one loop of the load generator (a page reload across a team, a load balancer restart).
    "burst": [dict(streams=100, n=60, dt=0.02, ramp=0.0), dict(streams=1000, n=30, dt=1.0, ramp=1.0)],
    # 8,000 streams open at 1 token/s for --soak-minutes, each replaced when it ends; the starts are
    # spread over one stream's length so that the replacements are too.  Sampled every 10 s.
    # Answers of 120 tokens: with 20, 8,000 open streams are 400 new streams a second, which is a
    # test of stream setup, not of holding streams.
    "soak": dict(streams=8000, n=120, dt=1.0, ramp=120.0, minutes=10.0, every=10.0),
}
QUICK: dict[str, Any] = {
    # CPU time is counted in 10 ms clock ticks: 5,000 events give nginx (~20 us each) about ten of
    # them, where 200 events often gave it none and so no ratio at all.
    "cpu": dict(streams=50, n=100, dt=0.005, ramp=0.05),
    "cpulight": dict(streams=50, n=100, dt=0.005, ramp=0.05),
    "ttft": [dict(streams=20, n=3, dt=0.02, ramp=0.12, ttft_from=0.06, concurrent=10),
             dict(streams=80, n=3, dt=0.02, ramp=0.12, ttft_from=0.06, concurrent=40)],
    "rates": [400, 800],
    "rate_streams": 20, "rate_seconds": 0.3, "rate_ramp": 0.05,
    "disconnect": dict(streams=20, n=100, dt=0.02, ramp=0.05, close_after=[1, 5]),
    "silent": dict(streams=10, ramp=0.05),
    "rss": dict(streams=100, n=100, dt=10.0, ramp=0.1),
    "warmup": dict(streams=10, n=3, dt=0.01, ramp=0.02),
    "concurrency": [50, 100],
    "concurrency_stream": dict(n=3, dt=0.1),
    "failover": dict(streams=20, n=3, dt=0.02, ramp=0.2),
    "stalled": dict(stalled=20, stalled_n=200, stalled_dt=0.005, settle=0.3, rounds=1, sndbuf=65536,
                    healthy=dict(streams=5, n=5, dt=0.02, ramp=0.05)),
    "redis_rate": 400,
    "burst": [dict(streams=20, n=60, dt=0.02, ramp=0.0)],
    # 500 streams, 50 at a time; the fake upstream closes each connection after its answer, so that
    # no idle pooled socket is left to wait out before open files are back to the baseline.
    "soak": dict(streams=50, n=10, dt=0.05, ramp=0.5, minutes=1.0, total=500, every=0.2, upstream_close=True),
}


def _print_stalled(head: str, r: dict[str, Any]) -> None:
    print(f"  stalled {head} ttft p50 {r['ttft_ms']['p50']} ms p99 {r['ttft_ms']['p99']} ms (direct p50 "
          f"{r['direct_ttft_ms']['p50']} ms), {r['seconds']} s, relay cpu {r['relay_cpu_per_s']} s/s", flush=True)


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures, each the median over ``runs`` (the stalled phase's rounds); counts summed."""
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {"streams": sum(r["streams"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "ttft_ms": {q: med([r["ttft_ms"][q] for r in runs]) for q in ("p50", "p99")},
            "direct_ttft_ms": {q: med([r["direct_ttft_ms"][q] for r in runs]) for q in ("p50", "p99")},
            "seconds": med([r["seconds"] for r in runs]),
            "relay_cpu_per_s": med([r["relay_cpu_per_s"] or 0.0 for r in runs])}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = QUICK if args.quick else FULL
        self.upstream = Upstream()
        self.nginx_bin = None if args.no_nginx else nginx_binary()
        self.runs = 0
        self.results: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []  # every load run: name, streams, ok, errors

    def close(self) -> None:
        self.upstream.close()

    def relay(self, config: Path | None = None, *, extra: tuple[str, ...] = (), workers: int = 1) -> Relay:
        return Relay(self.upstream.port, loop=self.args.relay_loop, src=self.args.relay_src, config=config,
                     extra=extra, workers=workers)

    def load(self, name: str, port: int, target: str, spec: dict[str, Any], *,
             hold: Any = None, watch: tuple[float, Any] | None = None) -> dict[str, Any]:
        """One load-generator run against ``port``; ``hold(held)`` runs while every stream is open;
        ``watch = (seconds, f)``: ``f()`` runs every that many seconds while the run lasts."""
        self.runs += 1
        path, kind = TARGETS[target]
        full = {"host": "127.0.0.1", "port": port, "path": path, "kind": kind, "upstream": self.upstream.port,
                "prefix": f"r{self.runs}-", "timeout": 180, **spec, "hold": hold is not None}
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(full)], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        if hold is not None:
            line = proc.stdout.readline()
            hold(json.loads(line)["held"])
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if watch is not None:
            every, f = watch
            while True:
                try:
                    proc.wait(timeout=every)
                    break
                except subprocess.TimeoutExpired:
                    f()
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"load generator failed ({name}): exit {proc.returncode}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        self.checks.append({"run": name, "target": target, "streams": result["streams"], "ok": result["ok"],
                            "errors": result["errors"], "error_samples": result["error_samples"]})
        if result["errors"]:
            print(f"  ! {name}: {result['errors']} of {result['streams']} streams failed: "
                  f"{result['error_samples'][:2]}", flush=True)
        return result

    def measured(self, name: str, port: int, target: str, spec: dict[str, Any], pids: list[int]) -> dict[str, Any]:
        """A load run with the CPU the ``pids`` used during it, per relayed event."""
        before = cpu_seconds(pids) if pids else 0.0
        up_before = cpu_seconds(self.upstream.pids)
        result = self.load(name, port, target, spec)
        cpu = cpu_seconds(pids) - before if pids else 0.0
        result["cpu_s"] = round(cpu, 3)
        result["upstream_cpu_s"] = round(cpu_seconds(self.upstream.pids) - up_before, 3)
        result["cpu_us_per_event"] = round(cpu / result["events"] * 1e6, 2) if pids and result["events"] else None
        return result

    def each_target(self, phase: str, spec: dict[str, Any], targets: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for target in targets:
            if target == "nginx" and self.nginx_bin is None:
                continue
            if target == "direct":
                out[target] = self.measured(f"{phase}/{target}", self.upstream.port, target, spec, [])
            elif target == "nginx":
                nginx = Nginx(self.upstream.port, self.nginx_bin)  # type: ignore[arg-type]
                try:
                    out[target] = self.measured(f"{phase}/{target}", nginx.port, target, spec, nginx.pids)
                finally:
                    nginx.close()
            else:
                relay = self.relay()
                try:
                    # A first small run, so that the measured one sees a warm process and a filled pool.
                    self.load(f"{phase}/{target}/warmup", relay.port, target, self.p["warmup"])
                    out[target] = self.measured(f"{phase}/{target}", relay.port, target, spec, relay.pids)
                finally:
                    relay.close()
            r = out[target]
            print(f"  {phase:>10} {target:>6}: {r['ok']}/{r['streams']} ok, {r['events']} events, "
                  f"cpu {r['cpu_us_per_event']} us/event, ttft p50 {r['ttft_ms']['p50']} ms "
                  f"p99 {r['ttft_ms']['p99']} ms, delay p99 {r['delay_ms']['p99']} ms, "
                  f"disconnect p99 {r['disconnect_ms']['p99']} ms", flush=True)
        return out

    # -- the phases ------------------------------------------------------------------------

    def cpu(self) -> None:
        self.results["cpu"] = self.each_target("cpu", self.p["cpu"], ("direct", "nginx", "chat", "v1", "responses"))

    def cpulight(self) -> None:
        """CPU per event unsaturated (50 streams of 150 tokens 100 ms apart): each chunk is its own
        wake-up, the shape of real traffic, where ``cpu``'s load batches several per wake-up."""
        self.results["cpulight"] = self.each_target("cpulight", self.p["cpulight"], ("nginx", "chat", "v1", "responses"))

    def ttft(self) -> None:
        self.results["ttft"] = {}
        for spec in self.p["ttft"]:
            spec = dict(spec)
            concurrent = spec.pop("concurrent")
            self.results["ttft"][str(concurrent)] = self.each_target(
                f"ttft@{concurrent}", spec, ("direct", "nginx", "chat", "v1"))

    def rates(self) -> None:
        """Raise the event rate until the p99 delay per event passes 50 ms (or a stream fails)."""
        out: dict[str, Any] = {}
        for target in ("chat", "v1"):
            relay = self.relay()
            steps = []
            try:
                self.load(f"rate/{target}/warmup", relay.port, target, self.p["warmup"])
                for rate in self.p["rates"]:
                    spec = self.rate_spec(rate)
                    r = self.measured(f"rate/{target}@{rate}", relay.port, target, spec, relay.pids)
                    passed = r["errors"] == 0 and (r["delay_ms"]["p99"] or 1e9) < 50
                    steps.append({"rate": rate, "passed": passed, "delay_ms": r["delay_ms"],
                                  "cpu_us_per_event": r["cpu_us_per_event"],
                                  "errors": r["errors"], "upstream_lag_ms": r["upstream_lag_ms"]})
                    print(f"  rate {target:>6} {rate:>6}/s: delay p99 {r['delay_ms']['p99']} ms, "
                          f"cpu {r['cpu_us_per_event']} us/event, errors {r['errors']}"
                          f"{'' if passed else '  <- over'}", flush=True)
                    if not passed:
                        break
            finally:
                relay.close()
            best = max((s["rate"] for s in steps if s["passed"]), default=0)
            out[target] = {"sustained_events_per_s": best, "steps": steps}
            # The floor at the rate that failed (or the top rate): is the harness itself keeping up?
            floor_rate = steps[-1]["rate"]
            spec = self.rate_spec(floor_rate)
            d = self.measured(f"rate/direct@{floor_rate}", self.upstream.port, "direct", spec, [])
            out[target]["direct_at_last_rate"] = {"rate": floor_rate, "delay_ms": d["delay_ms"]}
            print(f"  rate direct {floor_rate:>6}/s: delay p99 {d['delay_ms']['p99']} ms (the harness's floor)",
                  flush=True)
        self.results["rates"] = out

    def rate_spec(self, rate: int) -> dict[str, Any]:
        """``rate_streams`` streams whose tokens add up to ``rate`` per second; the delays counted are
        those of tokens due after every stream has started (the ramp is a burst of its own)."""
        streams, seconds, ramp = self.p["rate_streams"], self.p["rate_seconds"], self.p["rate_ramp"]
        dt = streams / rate
        return dict(streams=streams, dt=dt, n=max(3, int((ramp + 0.5 + seconds) / dt)), ramp=ramp,
                    measure_from=ramp + 0.5)

    def disconnect(self) -> None:
        self.results["disconnect"] = self.each_target("disconnect", self.p["disconnect"], ("nginx", "chat", "v1"))

    def burst(self) -> None:
        """Disconnect → upstream close when N clients leave at once, through nginx and the relay."""
        out: dict[str, Any] = {}
        for spec in self.p["burst"]:
            by: dict[str, Any] = {}
            for target in ("nginx", "chat", "v1", "responses"):
                if target == "nginx":
                    if self.nginx_bin is None:
                        continue
                    server: Relay | Nginx = Nginx(self.upstream.port, self.nginx_bin)
                else:
                    server = self.relay()
                try:
                    self.load(f"burst/{target}/warmup", server.port, target, self.p["warmup"])
                    r = self.load(f"burst/{target}@{spec['streams']}", server.port, target, spec,
                                  hold=lambda held: None)
                finally:
                    server.close()
                # The streams start together too (ramp 0): their TTFT is the per-answer set-up cost.
                by[target] = {"disconnect_ms": r["disconnect_ms"], "ttft_ms": r["ttft_ms"], "ok": r["ok"],
                              "errors": r["errors"]}
                d = r["disconnect_ms"]
                print(f"  burst {spec['streams']:>5} {target:>6}: started together: ttft p50 {r['ttft_ms']['p50']} ms, "
                      f"upstream closed p50 {d['p50']} ms p99 {d['p99']} ms "
                      f"max {d['max']} ms after the client (n={d['n']})", flush=True)
            out[str(spec["streams"])] = by
        self.results["burst"] = out

    def soak(self) -> None:
        """Streams held open for minutes, each replaced when it ends: the relay's RSS, open files and
        tasks sampled meanwhile (flat after warm-up?), every stream byte-exact, and open files and
        tasks back to the baseline once it is over."""
        spec = dict(self.p["soak"])
        minutes = spec.pop("minutes") if self.args.soak_minutes is None else self.args.soak_minutes
        if self.args.soak_streams:
            spec["streams"] = self.args.soak_streams
        every = spec.pop("every")
        spec["soak"] = minutes * 60
        spec["report_every"] = every
        relay = self.relay()
        pid = relay.pids[0]
        began = time.monotonic()

        def sample() -> dict[str, Any]:
            now = {"t": round(time.monotonic() - began, 1), "rss_kib": rss_kib(pid)}
            keys = ("open_files", "tasks", "live_streams", "kept_streams")
            try:
                h = relay.health()
            except OSError as exc:  # a relay too busy to answer in 5 s: recorded, not fatal
                return {**now, **dict.fromkeys(keys), "live_streams": 0, "health": repr(exc)}
            return {**now, **{key: h[key] for key in keys}}

        def settle(to: dict[str, Any], timeout: float) -> dict[str, Any]:
            """Until open files and tasks are down to ``to``'s (idle pooled upstream connections
            close after aiohttp's 15 s keep-alive), or ``timeout``."""
            deadline = time.monotonic() + timeout
            while True:
                now = sample()
                if (now["tasks"] is not None and now["open_files"] <= to["open_files"] and now["tasks"] <= to["tasks"]) \
                        or time.monotonic() > deadline:
                    return now
                time.sleep(0.1)

        samples: list[dict[str, Any]] = []
        try:
            fresh = sample()
            warm = dict(self.p["warmup"], upstream_close=spec.get("upstream_close", False))
            self.load("soak/warmup", relay.port, "chat", warm)
            # Idle pooled upstream connections close within aiohttp's 15 s; with upstream_close
            # there are none, and anything left after a few seconds is left for good.
            wait = 5.0 if spec.get("upstream_close") else 60.0
            baseline = settle(fresh, wait)
            print(f"  soak: {spec['streams']} streams for {minutes:g} min; baseline {baseline}", flush=True)
            r = self.load("soak/chat", relay.port, "chat", spec,
                          watch=(every, lambda: samples.append(sample())))
            after = settle(baseline, wait)
        finally:
            relay.close()
        # Flat after warm-up: of the samples with every stream open (not the ramp, not the drain at
        # the end), the second half against itself (its first samples, its last ones).
        full = [x for x in samples if x["live_streams"] >= 0.9 * spec["streams"] and x["tasks"] is not None]
        half = [x for x in full if x["t"] >= (full[0]["t"] + full[-1]["t"]) / 2] if full else []
        growth: dict[str, Any] = {}
        if len(half) >= 6:
            for key in ("rss_kib", "open_files", "tasks"):
                first = sorted(x[key] for x in half[:3])[1]
                last = sorted(x[key] for x in half[-3:])[1]
                growth[key] = {"first": first, "last": last, "pct": round((last - first) / first * 100, 2)}
        self.results["soak"] = {"chat": {**r, "minutes": minutes, "baseline": baseline, "after": after,
                                         "samples": samples, "second_half_growth": growth}}
        print(f"  soak   chat: {r['ok']}/{r['streams']} ok over {r['seconds']} s; second half {growth}; "
              f"after: open files {after['open_files']} (baseline {baseline['open_files']}), tasks {after['tasks']} "
              f"(baseline {baseline['tasks']}), rss {after['rss_kib']} KiB", flush=True)

    def silent(self) -> None:
        relay = self.relay()
        try:
            self.load("silent/warmup", relay.port, "chat", self.p["warmup"])
            r = self.load("silent/chat", relay.port, "chat", dict(self.p["silent"], silent=True, n=1, dt=1.0))
        finally:
            relay.close()
        self.results["silent"] = {"chat": r}
        print(f"  silent   chat: first byte p50 {r['ttfb_ms']['p50']} ms p99 {r['ttfb_ms']['p99']} ms; "
              f"disconnect → upstream close p99 {r['disconnect_ms']['p99']} ms (n={r['disconnect_ms']['n']})",
              flush=True)

    def rss(self) -> None:
        out: dict[str, Any] = {}
        spec = dict(self.p["rss"])
        if self.args.rss_streams:
            spec["streams"] = self.args.rss_streams
        for target in ("nginx", "chat", "v1"):
            if target == "nginx":
                if self.nginx_bin is None:
                    continue
                server: Relay | Nginx = Nginx(self.upstream.port, self.nginx_bin)
                pid = server.pids[-1]  # the worker
            else:
                server = self.relay()
                pid = server.pids[0]
            try:
                self.load(f"rss/{target}/warmup", server.port, target, self.p["warmup"])
                time.sleep(0.3)
                base = rss_kib(pid)
                seen: dict[str, int] = {}

                def at_hold(held: int) -> None:
                    time.sleep(0.1 if self.args.quick else 0.5)
                    seen["rss"], seen["held"] = rss_kib(pid), held

                r = self.load(f"rss/{target}", server.port, target, spec, hold=at_hold)
            finally:
                server.close()
            per = (seen["rss"] - base) / max(seen["held"], 1)
            out[target] = {"base_kib": base, "loaded_kib": seen["rss"], "streams": seen["held"],
                           "kib_per_stream": round(per, 2), "ok": r["ok"], "errors": r["errors"]}
            print(f"  rss {target:>6}: {base} KiB → {seen['rss']} KiB with {seen['held']} open streams: "
                  f"{per:.1f} KiB/stream", flush=True)
        self.results["rss"] = out

    def concurrency(self) -> None:
        out: dict[str, Any] = {"steps": []}
        best = 0
        for streams in self.p["concurrency"]:
            relay = self.relay()
            try:
                spec = dict(self.p["concurrency_stream"], streams=streams, ramp=max(0.2, streams / 2000))
                r = self.measured(f"concurrency/chat@{streams}", relay.port, "chat", spec, relay.pids)
            finally:
                relay.close()
            passed = r["errors"] == 0
            out["steps"].append({"streams": streams, "passed": passed, "errors": r["errors"],
                                 "error_samples": r["error_samples"][:2], "delay_ms": r["delay_ms"],
                                 "ttft_ms": r["ttft_ms"]})
            print(f"  concurrency {streams:>6}: {r['ok']}/{streams} ok, delay p99 {r['delay_ms']['p99']} ms, "
                  f"ttft p99 {r['ttft_ms']['p99']} ms", flush=True)
            if not passed:
                break
            best = streams
        out["max_streams"] = best
        self.results["concurrency"] = out

    def failover(self) -> None:
        """TTFT when every request's first upstream refuses its connection, against one upstream alone.

        The dead upstream's cooldown is kept at a millisecond, so (nearly) every request tries it
        first; how many did is read from the relay's own ``GET /v1/upstreams``.
        """
        dead = free_port()  # nothing listens there: the connect is refused
        conf = OUT / "failover.toml"
        OUT.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            "cooldown = 0.001\ncooldown-max = 0.001\n"
            f'[[upstreams]]\nname = "dead"\nurl = "http://127.0.0.1:{dead}/v1"\nmodels = "*"\npriority = 0\n'
            f'[[upstreams]]\nname = "live"\nurl = "http://127.0.0.1:{self.upstream.port}/v1"\nmodels = "*"\n'
            "priority = 1\n")
        out: dict[str, Any] = {}
        for label, config in (("one", None), ("failover", conf)):
            relay = self.relay(config)
            try:
                self.load(f"failover/{label}/warmup", relay.port, "chat", self.p["warmup"])
                out[label] = self.measured(f"failover/{label}", relay.port, "chat", self.p["failover"], relay.pids)
                if config is not None:
                    with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}/v1/upstreams") as resp:
                        state = {u["name"]: u for u in json.load(resp)["upstreams"]}
                    out[label]["dead_tried"] = state["dead"]["failures"]
            finally:
                relay.close()
            r = out[label]
            print(f"  failover {label:>8}: {r['ok']}/{r['streams']} ok, ttft p50 {r['ttft_ms']['p50']} ms "
                  f"p99 {r['ttft_ms']['p99']} ms" + (f", dead upstream tried {r['dead_tried']} times"
                                                     if "dead_tried" in r else ""), flush=True)
        self.results["failover"] = out

    def stalled(self) -> None:
        """Healthy streams beside readers that never read (tiny receive buffers), against the same
        healthy streams alone; the relay's CPU per second during each.

        One measurement is 20 streams, whose TTFT p50 varies by more from one run to the next than
        the effect measured (bench/RESULTS.md), so it is taken ``rounds`` times, alone and beside
        in turn, each on a fresh relay; the figures are the medians over the rounds.
        """
        spec = self.p["stalled"]
        rounds: dict[str, list[dict[str, Any]]] = {"alone": [], "beside-stalled": []}
        for n in range(spec["rounds"]):
            for label in ("alone", "beside-stalled"):
                r = self._stalled_round(f"stalled/{label}/{n}", spec, stalled=label != "alone")
                rounds[label].append(r)
                _print_stalled(f"{label:>14} #{n}: {r['ok']}/{r['streams']} ok,", r)
        out: dict[str, Any] = {label: _median_of(rs) for label, rs in rounds.items()}
        ratios = [b["ttft_ms"]["p50"] / a["ttft_ms"]["p50"] for a, b in zip(rounds["alone"], rounds["beside-stalled"])
                  if a["ttft_ms"]["p50"]]
        out["p50_ratio_per_round"] = [round(x, 2) for x in ratios]
        out["rounds"] = rounds
        for label in ("alone", "beside-stalled"):
            r = out[label]
            _print_stalled(f"{label:>14}: median of {spec['rounds']}:", r)
        self.results["stalled"] = out

    def _stalled_round(self, name: str, spec: dict[str, Any], *, stalled: bool) -> dict[str, Any]:
        relay = self.relay()
        sockets: list[socket.socket] = []
        try:
            if stalled:
                for i in range(spec["stalled"]):
                    sockets.append(stalled_reader(relay.port, request_body(
                        f"stall{i}", spec["stalled_n"], spec["stalled_dt"], openai=False, sndbuf=spec["sndbuf"])))
                time.sleep(spec["settle"])  # the scenario: stalled readers that have been there a while
            # Last, so both measurements find as many warm pooled upstream connections: the stalled
            # streams hold theirs (their answers are not over), and new ones cost a connect.
            self.load(f"{name}/warmup", relay.port, "chat", self.p["warmup"])
            r = self.measured(name, relay.port, "chat", spec["healthy"], relay.pids)
            # The same streams straight to the upstream, meanwhile: what of the TTFT is the
            # upstream's own (it, too, holds the stalled streams' connections).
            r["direct_ttft_ms"] = self.load(f"{name}/direct", self.upstream.port, "direct", spec["healthy"])["ttft_ms"]
        finally:
            for s in sockets:
                s.close()
            relay.close()
        r["relay_cpu_per_s"] = round(r["cpu_s"] / r["seconds"], 3) if r["seconds"] else None
        return r

    def redis(self) -> None:
        """One process, memory store against the Redis store: CPU per event (the relay's, and the
        relay's plus redis-server's), added TTFT at 100 streams, Redis round trips per event at
        the rate of ``redis_rate``."""
        out: dict[str, Any] = {}
        server = Redis()
        try:
            for label, extra in (("memory", ()), ("redis", ("--redis", server.url))):
                relay = self.relay(extra=extra)
                try:
                    self.load(f"redis/{label}/warmup", relay.port, "chat", self.p["warmup"])
                    r_before = cpu_seconds(server.pids)
                    h_before = relay.health().get("store", {})
                    r = self.measured(f"redis/{label}", relay.port, "chat", self.rate_spec(self.p["redis_rate"]),
                                      relay.pids)
                    h_after = relay.health().get("store", {})
                    r["redis_cpu_s"] = round(cpu_seconds(server.pids) - r_before, 3)
                    if h_after:
                        trips = h_after["round_trips"] - h_before.get("round_trips", 0)
                        written = h_after["events_written"] - h_before.get("events_written", 0)
                        r["round_trips_per_event"] = round(trips / written, 4) if written else None
                    spec = dict(self.p["ttft"][0])
                    spec.pop("concurrent")
                    r["ttft100"] = self.measured(f"redis/{label}/ttft", relay.port, "chat", spec, relay.pids)["ttft_ms"]
                finally:
                    relay.close()
                out[label] = r
                print(f"  redis {label:>7}: cpu {r['cpu_us_per_event']} us/event (+redis {r['redis_cpu_s']} s), "
                      f"delay p99 {r['delay_ms']['p99']} ms, ttft@100 p50 {r['ttft100']['p50']} ms, "
                      f"round trips/event {r.get('round_trips_per_event')}", flush=True)
        finally:
            server.close()
        self.results["redis"] = out

    def faults(self) -> None:
        """Redis stopped under a live stream with readers on two instances (bench/faults.py): how long
        requests and readers wait; with --compare-src, the previous main the same way."""
        from bench import faults

        out: dict[str, Any] = {}
        for label, src in (("relay", self.args.relay_src), ("previous", self.args.compare_src)):
            if label == "previous" and src is None:
                continue
            server = Redis()
            extra = ("--redis", server.url, "--rate-limit", "0")
            a = Relay(self.upstream.port, loop=self.args.relay_loop, src=src, extra=extra)
            b = Relay(self.upstream.port, loop=self.args.relay_loop, src=src, extra=extra)
            try:
                out[label] = r = faults.measure(a.port, b.port, server.proc.pid)
            finally:
                a.close()
                b.close()
                server.close()
            print(f"  faults {label:>8}: 201 while Redis is stopped first {r['create_s']['first']} s, p50 "
                  f"{r['create_s']['p50']} s; resume elsewhere {r['resume_elsewhere_s']} s "
                  f"({r.get('resume_elsewhere_status')}); reader elsewhere ended after {r['reader_end_s']} s "
                  f"({r['reader_end']}); local reader flowing: {r['local_reader_flowing']}", flush=True)
        self.results["faults"] = out

    def metrics(self) -> None:
        """CPU per event with --metrics-listen against without, for /chat and /v1: three alternating
        runs on two relays alive side by side (so neither is warmer), medians compared."""
        out: dict[str, Any] = {}
        off = self.relay()
        on = self.relay(extra=("--metrics-listen", f"127.0.0.1:{free_port()}"))
        try:
            for target in ("chat", "v1"):
                for relay in (off, on):
                    self.load(f"metrics/{target}/warmup", relay.port, target, self.p["warmup"])
                runs: dict[str, list[float]] = {"off": [], "on": []}
                for i in range(3):
                    for label, relay in (("off", off), ("on", on)):
                        r = self.measured(f"metrics/{target}/{label}/{i}", relay.port, target, self.p["cpu"],
                                          relay.pids)
                        runs[label].append(r["cpu_us_per_event"])
                med = {label: sorted(v)[1] for label, v in runs.items()}
                out[target] = {"runs": runs, "median_off": med["off"], "median_on": med["on"],
                               "ratio": round(med["on"] / med["off"], 3) if med["off"] else None}
                print(f"  metrics {target:>4}: cpu off {runs['off']} on {runs['on']} us/event; "
                      f"medians {med['off']} / {med['on']} = {out[target]['ratio']}x", flush=True)
        finally:
            off.close()
            on.close()
        self.results["metrics"] = out

    def remote(self) -> None:
        from bench.remote import run_remote

        self.results["remote"] = run_remote(rtt=self.args.remote_rtt, quick=self.args.quick, nginx_bin=self.nginx_bin,
                                            relay_loop=self.args.relay_loop, compare_src=self.args.compare_src,
                                            relay_src=self.args.relay_src)

    def workers(self) -> None:
        """--workers 1 against --workers N (both with Redis): sustained events/s (p99 delay under
        50 ms) and TTFT at the larger ``ttft`` load.  ``--workers-max`` sets N."""
        out: dict[str, Any] = {}
        server = Redis()
        try:
            for count in sorted({1, self.args.workers_max}):
                relay = self.relay(extra=("--redis", server.url), workers=count)
                steps = []
                try:
                    self.load(f"workers/{count}/warmup", relay.port, "chat", self.p["warmup"])
                    for rate in self.p["rates"]:
                        r = self.measured(f"workers/{count}@{rate}", relay.port, "chat", self.rate_spec(rate),
                                          relay.pids)
                        passed = r["errors"] == 0 and (r["delay_ms"]["p99"] or 1e9) < 50
                        steps.append({"rate": rate, "passed": passed, "delay_ms": r["delay_ms"],
                                      "cpu_us_per_event": r["cpu_us_per_event"]})
                        print(f"  workers {count} {rate:>6}/s: delay p99 {r['delay_ms']['p99']} ms"
                              f"{'' if passed else '  <- over'}", flush=True)
                        if not passed:
                            break
                    spec = dict(self.p["ttft"][-1])
                    spec.pop("concurrent")
                    ttft = self.measured(f"workers/{count}/ttft", relay.port, "chat", spec, relay.pids)["ttft_ms"]
                finally:
                    relay.close()
                best = max((s["rate"] for s in steps if s["passed"]), default=0)
                out[str(count)] = {"sustained_events_per_s": best, "steps": steps, "ttft_ms": ttft}
                print(f"  workers {count}: sustained {best} events/s, ttft p50 {ttft['p50']} ms p99 {ttft['p99']} ms",
                      flush=True)
        finally:
            server.close()
        self.results["workers"] = out


def stalled_reader(port: int, body: bytes) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


def figures(res: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The headline figures against their goals (goal, stretch)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, value: Any, unit: str, goal: Any = None, stretch: Any = None, lower: bool = True) -> None:
        met = None
        if value is not None and goal is not None:
            met = "stretch" if (stretch is not None and (value <= stretch if lower else value >= stretch)) else (
                "yes" if (value <= goal if lower else value >= goal) else "NO")
        rows.append({"figure": name, "value": value, "unit": unit, "goal": goal, "stretch": stretch, "met": met})

    cpu = res["cpu"]
    nginx_cpu = cpu.get("nginx", {}).get("cpu_us_per_event")
    row("nginx CPU per event", nginx_cpu, "us")
    for t in ("chat", "v1"):
        us = cpu[t]["cpu_us_per_event"]
        row(f"relay {t} CPU per event", us, "us")
        row(f"relay {t} CPU / nginx", round(us / nginx_cpu, 2) if nginx_cpu else None, "x", 3, 2)
    for phase in ("cpu", "cpulight"):
        by = res.get(phase) or {}
        if by.get("responses", {}).get("cpu_us_per_event") and by.get("v1", {}).get("cpu_us_per_event"):
            row(f"relay responses CPU per event / v1 ({phase})",
                round(by["responses"]["cpu_us_per_event"] / by["v1"]["cpu_us_per_event"], 2), "x", 1.1)
    light = res.get("cpulight")
    if light:
        ref = light.get("nginx", {}).get("cpu_us_per_event")
        for t in ("chat", "v1"):
            us = light[t]["cpu_us_per_event"]
            row(f"relay {t} CPU per event unsaturated / nginx", round(us / ref, 2) if ref and us else None, "x",
                *((3.4, 3) if t == "v1" else ()))
    for t in ("chat", "v1"):
        row(f"relay {t} sustained events/s (p99 delay < 50 ms)", res["rates"][t]["sustained_events_per_s"],
            "ev/s")
    for conc, by in res["ttft"].items():
        direct = by["direct"]["ttft_ms"]
        for t in ("nginx", "chat", "v1"):
            if t not in by:
                continue
            mine = by[t]["ttft_ms"]
            for q in ("p50", "p99"):
                added = round(mine[q] - direct[q], 2)
                goal = (10, 5) if (q == "p50" and t != "nginx" and conc == max(res["ttft"], key=int)) else (None, None)
                row(f"added TTFT {q} {t} @{conc}", added, "ms", *goal)
    for t, r in res["disconnect"].items():
        d = r["disconnect_ms"]
        row(f"disconnect → upstream close p50 {t}", d["p50"], "ms")
        row(f"disconnect → upstream close p99 {t}", d["p99"], "ms", *((5, None) if t != "nginx" else (None, None)))
    for n, by in res.get("burst", {}).items():
        ref = by.get("nginx", {}).get("disconnect_ms", {}).get("p50")
        for t, r in by.items():
            d = r["disconnect_ms"]
            row(f"burst of {n} disconnects → upstream close p50 {t}", d["p50"], "ms")
            if t != "nginx":
                row(f"burst of {n}: p50 {t} / nginx", round(d["p50"] / ref, 2) if ref and d["p50"] else None,
                    "x", *((2, None) if n == "100" else ()))
            row(f"burst of {n} disconnects → upstream close max {t}", d["max"], "ms",
                *((10, None) if n == "100" and t != "nginx" else ()))
    if "soak" in res:
        s = res["soak"]["chat"]
        for key, label in (("rss_kib", "RSS"), ("open_files", "open files"), ("tasks", "tasks")):
            g = s["second_half_growth"].get(key)
            row(f"soak: {label} growth over the second half", g["pct"] if g else None, "%", *((2, None) if g else ()))
        for key in ("open_files", "tasks"):
            row(f"soak: {key.replace('_', ' ')} after / baseline",
                f"{s['after'][key]}/{s['baseline'][key]}", "")
        row("soak: streams byte-exact", f"{s['ok']}/{s['streams']}", "")
    for t, r in res["rss"].items():
        row(f"RSS per open stream {t} ({r['streams']} streams)", r["kib_per_stream"], "KiB",
            *((32, 20) if t != "nginx" else (None, None)))
    row("most concurrent streams (chat, 1 token/s)", res["concurrency"]["max_streams"], "streams",
        None if quick else 8000, None, lower=False)
    s = res["silent"]["chat"]
    row("first byte while upstream silent p50", s["ttfb_ms"]["p50"], "ms", 5)
    row("first byte while upstream silent p99", s["ttfb_ms"]["p99"], "ms", 5)
    if "failover" in res:
        f = res["failover"]
        for q in ("p50", "p99"):
            row(f"failover added TTFT {q} (first upstream refuses)",
                round(f["failover"]["ttft_ms"][q] - f["one"]["ttft_ms"][q], 2), "ms", *((2, None) if q == "p50" else ()))
        row("failover: requests that tried the dead upstream first", f["failover"].get("dead_tried"), "of "
            f"{f['failover']['streams']}")
    if "stalled" in res:
        alone, beside = res["stalled"]["alone"], res["stalled"]["beside-stalled"]
        for q in ("p50", "p99"):
            a, b = alone["ttft_ms"][q], beside["ttft_ms"][q]
            row(f"stalled readers: healthy TTFT {q} beside / alone (medians)", round(b / a, 2) if a else None, "x",
                *((1.1, None) if q == "p50" else ()))
        if "direct_ttft_ms" in alone:
            added = {k: round(r["ttft_ms"]["p50"] - r["direct_ttft_ms"]["p50"], 2) for k, r in
                     (("alone", alone), ("beside", beside))}
            row("stalled readers: relay's added TTFT p50 beside", added["beside"], "ms")
            row("stalled readers: relay's added TTFT p50 alone", added["alone"], "ms")
        if res["stalled"].get("p50_ratio_per_round"):
            row("stalled readers: healthy TTFT p50 beside / alone, worst round", max(res["stalled"]["p50_ratio_per_round"]),
                "x")
        row("stalled readers: healthy run time beside / alone",
            round(beside["seconds"] / alone["seconds"], 2) if alone["seconds"] else None, "x", 1.1)
        row("stalled readers: relay CPU per second beside them", beside["relay_cpu_per_s"], "s/s")
    if "redis" in res:
        mem, red = res["redis"]["memory"], res["redis"]["redis"]
        if mem["cpu_us_per_event"] and red["cpu_us_per_event"]:
            row("redis store: relay CPU per event / memory", round(red["cpu_us_per_event"] / mem["cpu_us_per_event"], 2),
                "x", 1.3)
            both = (red["cpu_s"] + red["redis_cpu_s"]) / red["events"] * 1e6 if red["events"] else None
            row("redis store: relay + redis-server CPU per event / memory",
                round(both / mem["cpu_us_per_event"], 2) if both else None, "x")
        row("redis store: added TTFT p50 @100 vs memory", round(red["ttft100"]["p50"] - mem["ttft100"]["p50"], 2),
            "ms", 1)
        row("redis store: round trips per relayed event", red.get("round_trips_per_event"), "", 0.2)
    if "faults" in res and "relay" in res["faults"]:
        f = res["faults"]["relay"]
        row("redis stopped: 201 on the producer, first request", f["create_s"]["first"], "s", 0.3)
        row("redis stopped: 201 on the producer, median after", f["create_s"]["p50"], "s", 0.05)
        row("redis stopped: resume of another instance's stream (503)", f["resume_elsewhere_s"], "s", 0.3)
        row("redis stopped: a reader elsewhere gets its end", f["reader_end_s"], "s", 2)
    if "metrics" in res:
        for t, r in res["metrics"].items():
            row(f"metrics on: relay {t} CPU per event / off (medians of 3)", r["ratio"], "x", 1.05)
    if "remote" in res:
        for name, by in res["remote"]["scenarios"].items():
            nginx_cpu = by.get("nginx", {}).get("cpu_ms_per_answer")
            for t, r in by.items():
                if t == "direct":
                    continue
                row(f"remote {name}: new upstream connections per answer, {t}", r["new_connections_per_answer"], "",
                    *((0.05, None) if t == "relay" else ()))
                row(f"remote {name}: added TTFT p50 over direct, {t}", r["added_ttft_ms"]["p50"], "ms",
                    *((2, None) if t == "relay" else ()))
                row(f"remote {name}: added TTFT p99 over direct, {t}", r["added_ttft_ms"]["p99"], "ms")
                row(f"remote {name}: CPU per answer, {t}", r.get("cpu_ms_per_answer"), "ms")
                if t.startswith("relay") and nginx_cpu:
                    row(f"remote {name}: CPU per answer {t} / nginx", round(r["cpu_ms_per_answer"] / nginx_cpu, 2), "x",
                        *((4, None) if t == "relay" and "300" in name else ()))
    if "workers" in res:
        by = res["workers"]
        for count, r in by.items():
            row(f"--workers {count}: sustained events/s (p99 delay < 50 ms)", r["sustained_events_per_s"], "ev/s")
            row(f"--workers {count}: TTFT p50 at the large ttft load", r["ttft_ms"]["p50"], "ms")
    return rows


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "loadavg_before": open("/proc/loadavg").read().split()[:3], "python": platform.python_version(),
            "kernel": platform.release(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':<52} {'value':>10} {'unit':<7} {'goal':>6} {'stretch':>7}  met"]
    for r in rows:
        goal = "" if r["goal"] is None else f"{'≤' if r['unit'] != 'streams' else '≥'}{r['goal']}"
        stretch = "" if r["stretch"] is None else f"{r['stretch']}"
        lines.append(f"{r['figure']:<52} {r['value']!s:>10} {r['unit']:<7} {goal:>6} {stretch:>7}  {r['met'] or ''}")
    return "\n".join(lines)


PHASES = ("cpu", "cpulight", "ttft", "rates", "disconnect", "burst", "silent", "rss", "soak", "concurrency", "failover", "stalled", "redis", "remote",
          "workers", "metrics", "faults")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds (tiny loads)")
    parser.add_argument("--relay-loop", choices=["asyncio", "uvloop", "auto"], default=None,
                        help="passed to relay serve --loop (default: the relay's own default)")
    parser.add_argument("--relay-src", type=Path, default=None,
                        help="run the relay package from this directory instead (e.g. an older version: "
                        "git archive REV relay | tar -x -C DIR)")
    parser.add_argument("--workers-max", type=int, default=max(2, os.cpu_count() or 2),
                        help="the --workers N compared with --workers 1 (default: the cores, at least 2)")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="how long the soak phase holds its streams (default: 10 full, 1 quick, capped at 500 "
                        "streams)")
    parser.add_argument("--soak-streams", type=int, default=None,
                        help="streams the soak phase keeps open (default: 8,000 full, 50 quick)")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even if it is installed")
    parser.add_argument("--rss-streams", type=int, default=None,
                        help="idle streams the rss phase holds (default: 5,000 full, 100 quick)")
    parser.add_argument("--remote-rtt", type=float, default=0.04,
                        help="the round trip the remote phase adds between the relay and its TLS upstream, seconds")
    parser.add_argument("--compare-src", type=Path, default=None,
                        help="the remote and faults phases also run the relay package from this directory (e.g. the previous "
                        "main: git archive REV relay | tar -x -C DIR), in the same run")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only these phases (repeatable)")
    parser.add_argument("--label", default="", help="a word for the output file name (e.g. before, after-uvloop)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory for the JSON (default: {OUT})")
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    info = machine()
    info["nofile"] = nofile
    print(f"bench: {info['cores']} cores, {info['memory_gib']} GiB, load {' '.join(info['loadavg_before'])}, "
          f"open files {nofile}, {'quick' if args.quick else 'full'} run", flush=True)
    bench = Bench(args)
    started = time.monotonic()
    try:
        for phase in args.only or PHASES:
            began = time.monotonic()
            getattr(bench, phase)()
            print(f"  ({phase}: {time.monotonic() - began:.1f} s)", flush=True)
    finally:
        bench.close()
    info["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    info["seconds"] = round(time.monotonic() - started, 1)
    rows = figures(bench.results, args.quick) if not args.only else []
    failed = [c for c in bench.checks if c["errors"] and "concurrency" not in c["run"]]
    report = {"machine": info, "quick": args.quick, "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
              "figures": rows, "results": bench.results, "checks": bench.checks,
              "content_ok": not failed}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{'quick' if args.quick else 'full'}{'-' + args.label if args.label else ''}-{stamp}.json"
    (out / name).write_text(json.dumps(report, indent=1))
    (out / "latest.json").write_text(json.dumps(report, indent=1))
    print()
    if rows:
        print(table(rows))
    print(f"\nload {' '.join(info['loadavg_before'])} → {' '.join(info['loadavg_after'])}; "
          f"{info['seconds']} s; content checks {'passed' if not failed else 'FAILED'} "
          f"({sum(c['streams'] for c in bench.checks)} streams); written to {out / name}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
