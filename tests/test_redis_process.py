"""Real ``relay serve`` processes sharing one real Redis: kill -9, --workers, TLS, secrets.

The upstream is the fake (tests/conftest.py) in this process; every relay process is stopped
and waited for (a worker is in its own session, so the supervisor's SIGTERM is what ends it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import redis_server
from conftest import FakeUpstream, SSEClient, chunk, require, sse, text_of
from procs import REPO, NotifyListener, Relay, port_of, spawn_relay

FAST = ("--owner-ttl", "0.6", "--presence-ttl", "0.6", "--drain-timeout", "1", "--rate-limit", "0")


def endless(first: list[str]) -> Any:
    """Sends ``first``, then one more chunk whenever ``fake.release`` is set, never finishing."""
    async def run(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        for part in first:
            await fake.send(resp, sse(chunk(part)))
        await asyncio.Event().wait()
        return resp
    return run


async def in_redis(url: str, event_id: str) -> None:
    """Wait until the event with this id has reached Redis (the writer is a round trip behind)."""
    import redis.asyncio as aioredis

    stream_id, _, seq = event_id.rpartition(".")
    client = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while not await client.xrange(f"relay:{{{stream_id}}}:log", f"{seq}-1", f"{seq}-1"):
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def stop(relay: Relay) -> int:
    """SIGTERM and wait: the supervisor drains its workers and reaps them before it exits."""
    if relay.proc.returncode is None:
        relay.proc.send_signal(signal.SIGTERM)
    return await relay.exit_status(60)


async def events(resp: aiohttp.ClientResponse) -> list[Any]:
    reader = SSEClient(resp)
    out = []
    while (event := await reader.next()) is not None:
        out.append(event)
    return out


async def head(resp: aiohttp.ClientResponse, count: int) -> list[Any]:
    reader = SSEClient(resp)
    out = []
    while len(out) < count:
        event = await reader.next()
        assert event is not None
        out.append(event)
    return out


async def test_kill_9_of_the_producer_resume_elsewhere_replays_and_ends_interrupted(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = endless(["one ", "two "])
    notify_a, notify_b = NotifyListener(), NotifyListener()
    try:
        async with spawn_relay(tmp_path, upstream, "--redis", redis.url, *FAST, notify=notify_a) as a, \
                spawn_relay(tmp_path, upstream, "--redis", redis.url, *FAST, notify=notify_b) as b:
            port_a = port_of(await notify_a.until("READY"))
            port_b = port_of(await notify_b.until("READY"))
            resp = await session.post(f"http://127.0.0.1:{port_a}/chat", json={"prompt": "hi"})
            got = await head(resp, 3)
            location = resp.headers["Location"]
            # Until B has what A sent (the writer's round trip is a few ms behind A's own readers).
            async with asyncio.timeout(10):
                while True:
                    probe = await session.get(f"http://127.0.0.1:{port_b}{location}",
                                              headers={"Last-Event-ID": got[1].id})
                    if probe.status == 200:
                        assert [e.data for e in await head(probe, 1)] == [got[2].data]
                        probe.close()
                        break
                    probe.close()
                    await asyncio.sleep(0.02)
            a.proc.kill()  # kill -9: no drain, no last event, the owner key simply stops being renewed
            await a.proc.wait()
            resp.close()
            again = await session.get(f"http://127.0.0.1:{port_b}{location}", headers={"Last-Event-ID": got[0].id})
            assert again.status == 200
            rest = await events(again)
            assert [(e.id, e.data) for e in rest[:2]] == [(e.id, e.data) for e in got[1:3]]
            end = json.loads(rest[-1].data)
            assert (end["type"], end["code"], end["retriable"]) == ("error", "interrupted", True)
            assert len(rest) == 3
            assert upstream.calls == 1
            assert await stop(b) == 0
    finally:
        notify_a.close()
        notify_b.close()


async def test_workers_without_redis_is_refused_with_one_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--workers", "2", cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().count("\n") == 1 and "--workers 2 needs --redis" in err.decode()


async def test_workers_auto_without_redis_is_refused_whatever_it_resolves_to() -> None:
    proc = await asyncio.create_subprocess_exec(
        "taskset", "-c", "0", sys.executable, "-m", "relay", "serve", "--workers", "auto", cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # one CPU: auto resolves to 1, still refused
    _, err = await proc.communicate()
    assert proc.returncode == 2 and "--workers auto needs --redis" in err.decode()


async def test_two_workers_serve_and_a_resume_lands_on_either_one(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession,
        notify: NotifyListener) -> None:
    upstream.behaviour = endless(["one ", "two "])
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", *FAST, notify=notify) as sup:
        ready = await notify.until("READY")
        assert "2 workers" in ready["STATUS"]
        port = port_of(ready)
        resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
        got = await head(resp, 3)
        producer = resp.headers["Relay-Worker"]
        # The other worker finds the stream in Redis, which the writer reaches a round trip after
        # the client has the events (a resume sooner than that would be a 404 there).
        await in_redis(redis.url, got[2].id)
        seen: dict[str, list[str]] = {}
        for _ in range(60):  # bounded: new connections until both workers have answered a resume
            async with aiohttp.ClientSession() as fresh:
                again = await fresh.get(f"http://127.0.0.1:{port}{resp.headers['Location']}",
                                        headers={"Last-Event-ID": got[0].id})
                assert again.status == 200
                replay = await head(again, 2)
                seen[again.headers["Relay-Worker"]] = [e.data for e in replay]
                again.close()
            if len(seen) == 2:
                break
        assert set(seen) == {"1", "2"}
        assert all(data == [got[1].data, got[2].data] for data in seen.values())
        assert producer in seen
        resp.close()
        assert await stop(sup) == 0
        assert "all 2 workers listen" in sup.output()
        assert (await notify.until("STOPPING"))["STOPPING"] == "1"


async def test_a_worker_that_dies_is_replaced_and_its_streams_resume_on_another(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession,
        notify: NotifyListener) -> None:
    upstream.behaviour = endless(["one "])
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", *FAST, notify=notify) as sup:
        port = port_of(await notify.until("READY"))
        resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
        got = await head(resp, 2)
        victim = resp.headers["Relay-Worker"]
        await in_redis(redis.url, got[1].id)
        pids = dict(re.findall(r"worker (\d) started \(pid (\d+)\)", sup.output()))
        os.kill(int(pids[victim]), signal.SIGKILL)
        with pytest.raises(aiohttp.ClientPayloadError):  # the connection drops: no made-up end
            await events(resp)
        resp.close()
        async with asyncio.timeout(20):
            while len(re.findall(rf"worker {victim} started", sup.output())) < 2:
                await asyncio.sleep(0.05)
        assert f"worker {victim} (pid {pids[victim]}) exited unexpectedly" in sup.output()
        again = await session.get(f"http://127.0.0.1:{port}{resp.headers['Location']}",
                                  headers={"Last-Event-ID": got[1].id})
        assert again.status == 200
        end = json.loads((await events(again))[-1].data)
        assert end["code"] == "interrupted"
        assert await stop(sup) == 0


async def test_sighup_reloads_tokens_in_every_worker_without_restarting_them(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-old-0123456789\n")
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", "--tokens-file",
                           str(tokens), *FAST, notify=notify) as sup:
        port = port_of(await notify.until("READY"))
        tokens.write_text("tok-new-0123456789\n")
        sup.proc.send_signal(signal.SIGHUP)
        await notify.until("RELOADING")
        answered: set[str] = set()
        async with asyncio.timeout(20):
            while answered != {"1", "2"}:
                async with aiohttp.ClientSession() as fresh, fresh.get(
                        f"http://127.0.0.1:{port}/v1/models",
                        headers={"Authorization": "Bearer tok-new-0123456789"}) as resp:
                    await resp.read()
                    status, worker = resp.status, resp.headers["Relay-Worker"]
                if status == 200:
                    answered.add(worker)
                else:
                    await asyncio.sleep(0.02)  # that worker has not read the file yet
        assert sup.output().count("started (pid") == 2  # nobody was restarted
        assert await stop(sup) == 0


async def test_redis_unreachable_at_start_is_one_line_and_exit_1(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with spawn_relay(tmp_path, upstream, "--redis", f"unix://{tmp_path}/none.sock",
                           env={"RELAY_REDIS_PASSWORD": "hunter2-secret"}) as relay:
        assert await relay.exit_status() == 1
        out = relay.output()
        assert "relay: error: cannot use Redis at unix://" in out
        assert "hunter2" not in out


async def test_a_password_in_the_redis_flag_is_refused() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--redis", "redis://:hunter2@127.0.0.1:1/0", cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "must not hold the password" in err.decode() and "hunter2" not in err.decode()


@pytest.fixture
async def tls_redis() -> AsyncIterator[redis_server.RedisServer]:
    require(redis_server.available(), "redis-server is not installed (apt-get install redis-server)")
    require(shutil.which("openssl") is not None, "openssl is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="relay-redis-tls-"))
    ca, ca_key, cert, key = (workdir / n for n in ("ca.pem", "ca.key", "server.pem", "server.key"))
    run = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=throwaway test CA"]
    subprocess.run([*run, "-keyout", str(ca_key), "-out", str(ca)], check=True, capture_output=True)
    csr = workdir / "server.csr"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    ext = workdir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    server = redis_server.RedisServer(workdir, tls=(ca, cert, key))
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_rediss_with_a_password_from_the_environment(
        tls_redis: redis_server.RedisServer, tmp_path: Path, upstream: FakeUpstream,
        session: aiohttp.ClientSession, notify: NotifyListener) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(tls_redis.url)
    await admin.config_set("requirepass", "tls-pass-0123456789")
    await admin.aclose()
    async with spawn_relay(tmp_path, upstream, "--redis", tls_redis.url, *FAST, notify=notify,
                           env={"RELAY_REDIS_PASSWORD": "tls-pass-0123456789"}) as relay:
        port = port_of(await notify.until("READY"))
        resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
        whole = await events(resp)
        assert text_of([json.loads(e.data) for e in whole]) == "Hello, world!"
        again = await session.get(f"http://127.0.0.1:{port}{resp.headers['Location']}")
        assert [e.data for e in await events(again)] == [e.data for e in whole]
        try:
            assert await stop(relay) == 0
        finally:
            print(relay.output())
        assert "rediss://127.0.0.1" in relay.output()
        assert "tls-pass" not in relay.output()


async def test_a_stuck_worker_is_replaced_while_the_other_serves_and_the_watchdog_stays_fed(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", "--worker-timeout", "1",
                           *FAST, notify=notify, env={"WATCHDOG_USEC": "400000"}, pid_vars=("WATCHDOG_PID",)) as sup:
        port = port_of(await notify.until("READY"))
        assert (await notify.until("WATCHDOG"))["WATCHDOG"] == "1"
        pids = dict(re.findall(r"worker (\d) started \(pid (\d+)\)", sup.output()))
        stuck = int(pids["1"])
        os.kill(stuck, signal.SIGSTOP)  # a worker whose loop no longer runs
        try:
            # While it is stuck, the other worker serves (it alone accepts connections).
            async with aiohttp.ClientSession() as fresh:
                resp = await fresh.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"},
                                        headers={"Accept": "application/json"})
                assert resp.status == 201 and resp.headers["Relay-Worker"] == "2"
            async with asyncio.timeout(30):
                while f"worker 1 (pid {stuck}) was killed for missing its heartbeat" not in sup.output() \
                        or sup.output().count("worker 1 started") < 2:
                    await asyncio.sleep(0.05)
            assert f"worker 1 (pid {stuck}) missed its heartbeat" in sup.output()
            with pytest.raises(ProcessLookupError):
                os.kill(stuck, 0)  # killed and reaped by the supervisor
            # The watchdog is fed after the stuck worker was found: systemd restarts nothing.
            while True:
                try:
                    notify.sock.recv(65536)
                except BlockingIOError:
                    break
            assert (await notify.until("WATCHDOG"))["WATCHDOG"] == "1"
        finally:
            try:
                os.kill(stuck, signal.SIGCONT)
            except ProcessLookupError:
                pass
        # The new worker 1 serves too.
        pids = dict(re.findall(r"worker (\d) started \(pid (\d+)\)", sup.output()))
        assert int(pids["1"]) != stuck
        assert "stopped answering" not in sup.output()
        assert await stop(sup) == 0


async def test_redis_without_its_library_is_one_line_and_exit_2() -> None:
    script = ("import sys; sys.modules['redis'] = None; from relay.run.cli import main; "
              "sys.exit(main(['serve', '--redis', 'redis://127.0.0.1:1/0']))")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode() == ("relay: error: --redis needs the redis library: "
                            f"{sys.executable} -m pip install 'redis[hiredis]>=5'\n")


async def test_a_worker_that_keeps_dying_before_it_is_ready_backs_off_then_the_supervisor_exits_1(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", *FAST, notify=notify) as sup:
        await notify.until("READY")
        killed: list[str] = []
        async with asyncio.timeout(60):
            while sup.proc.returncode is None:
                started = re.findall(r"worker 1 started \(pid (\d+)\)", sup.output())
                if started[-1] not in killed:
                    killed.append(started[-1])
                    os.kill(int(started[-1]), signal.SIGKILL)  # before the new one can say READY
                await asyncio.sleep(0.005)
        assert sup.proc.returncode == 1
        out = sup.output()
        assert "worker 1 died 5 times in a row before it was ready: giving up" in out
        assert len(killed) == 6  # the first (ready) one, then five that never were
        # Every process is gone: the other worker was stopped, not left behind.
        pids = re.findall(r"worker \d started \(pid (\d+)\)", out)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)


async def test_with_two_workers_one_scrape_of_the_supervisor_sees_both_workers_streams(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from prometheus_client.parser import text_string_to_metric_families

    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", "--metrics-listen",
                           "127.0.0.1:0", *FAST, notify=notify, env={"TMPDIR": str(tmp_path)}) as sup:
        port = port_of(await notify.until("READY"))
        found = re.search(r"metrics of every worker on (http://\S+/metrics)", sup.output())
        assert found is not None, sup.output()
        by_worker: dict[str, int] = {}
        for _ in range(60):  # bounded: new connections until both workers have run a stream
            async with aiohttp.ClientSession() as fresh:
                resp = await fresh.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
                assert text_of([json.loads(e.data) for e in await events(resp)]).startswith("Hello")
                worker = resp.headers["Relay-Worker"]
                by_worker[worker] = by_worker.get(worker, 0) + 1
                assert (await fresh.get(f"http://127.0.0.1:{port}/metrics")).status == 404
            if len(by_worker) == 2:
                break
        assert set(by_worker) == {"1", "2"}
        async with aiohttp.ClientSession() as fresh, fresh.get(found.group(1)) as scraped:
            text = await scraped.text()
        finished = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
                    for s in f.samples if s.name == "relay_generations_finished_total"}
        assert finished == {(("endpoint", "chat"), ("model", "fake-model"), ("outcome", "done"),
                             ("upstream", "upstream")): sum(by_worker.values())}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("relay-metrics-")]  # the value files
        assert await stop(sup) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("relay-metrics-")]  # removed at exit


async def test_a_dead_workers_live_gauges_leave_the_merged_metrics_and_its_counters_stay(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession,
        notify: NotifyListener) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the metrics extra) is not installed")
    from test_metrics import scrape, value

    upstream.behaviour = endless(["one "])
    async with spawn_relay(tmp_path, upstream, "--redis", redis.url, "--workers", "2", "--metrics-listen",
                           "127.0.0.1:0", *FAST, notify=notify) as sup:
        port = port_of(await notify.until("READY"))
        found = re.search(r"metrics of every worker on (http://\S+/metrics)", sup.output())
        assert found is not None
        url = found.group(1)
        resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
        await head(resp, 2)
        victim = resp.headers["Relay-Worker"]
        live = await scrape(url)
        assert value(live, "relay_streams_live", endpoint="chat") == 1
        assert value(live, "relay_generations_started_total", endpoint="chat", model="fake-model") == 1
        pids = dict(re.findall(r"worker (\d) started \(pid (\d+)\)", sup.output()))
        os.kill(int(pids[victim]), signal.SIGKILL)
        resp.close()
        async with asyncio.timeout(20):
            while len(re.findall(rf"worker {victim} started", sup.output())) < 2:
                await asyncio.sleep(0.05)
        after = await scrape(url)
        assert value(after, "relay_streams_live", endpoint="chat") == 0  # the dead one's gauge is gone
        assert value(after, "relay_generations_started_total", endpoint="chat", model="fake-model") == 1
        assert await stop(sup) == 0


def _children_named(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == pid and comm == name:
                found.append(int(entry.name))
    return found


async def test_redis_local_starts_a_private_redis_for_the_workers_and_stops_it(
        tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession, notify: NotifyListener) -> None:
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    upstream.behaviour = endless(["one ", "two "])
    async with spawn_relay(tmp_path, upstream, "--redis", "local", "--workers", "2", *FAST, notify=notify) as sup:
        port = port_of(await notify.until("READY"))
        servers = _children_named(sup.proc.pid, "redis-server")
        assert len(servers) == 1, sup.output()
        # redis-server names its socket in its process title; asked there, it has no TCP port and
        # no persistence.
        title = Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0")[0].decode()
        import redis.asyncio as aioredis

        client = aioredis.Redis(unix_socket_path=title.split("unixsocket:", 1)[1])
        try:
            assert (await client.config_get("port"))["port"] == "0"
            assert (await client.config_get("save"))["save"] == ""
            assert (await client.config_get("appendonly"))["appendonly"] == "no"
        finally:
            await client.aclose()
        resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"})
        got = await head(resp, 3)
        seen: set[str] = set()
        for _ in range(60):  # bounded: new connections until both workers have answered a resume
            async with aiohttp.ClientSession() as fresh:
                again = await fresh.get(f"http://127.0.0.1:{port}{resp.headers['Location']}",
                                        headers={"Last-Event-ID": got[0].id})
                if again.status == 200:
                    replay = await head(again, 2)
                    assert [e.data for e in replay] == [got[1].data, got[2].data]
                    seen.add(again.headers["Relay-Worker"])
                again.close()
            if len(seen) == 2:
                break
        assert seen == {"1", "2"}
        resp.close()
        assert await stop(sup) == 0
    assert not Path(f"/proc/{servers[0]}").exists()  # stopped by its PID and reaped


async def test_redis_local_without_redis_server_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--redis", "local", cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}, "PATH": str(bare)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert err.decode().count("\n") == 1 and "--redis local needs redis-server on PATH" in err.decode()


async def test_kill_9_of_a_background_responses_producer_gives_readers_elsewhere_the_interrupted_end(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, aiohttp_server: Any) -> None:
    import openai

    from test_responses_background import GatedUpstream

    fake = GatedUpstream(hold=11)
    app = web.Application()
    app.router.add_post("/v1/responses", fake.handler)
    url = str((await aiohttp_server(app)).make_url("/v1"))
    notify_a, notify_b = NotifyListener(), NotifyListener()
    try:
        async with spawn_relay(tmp_path, upstream, "--upstream", url, "--redis", redis.url, *FAST,
                               notify=notify_a) as a, \
                spawn_relay(tmp_path, upstream, "--upstream", url, "--redis", redis.url, *FAST,
                            notify=notify_b) as b:
            port_a = port_of(await notify_a.until("READY"))
            port_b = port_of(await notify_b.until("READY"))
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port_a}/v1", api_key="k",
                                          max_retries=0) as on_a, \
                    openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port_b}/v1", api_key="k",
                                       max_retries=0) as on_b:
                created = await on_a.responses.create(model="fake-model", input="hi", background=True)
                async with asyncio.timeout(10):
                    await fake.held.wait()
                    # Until B sees all that A has made (A's writer is a round trip behind).
                    while (await on_b.responses.retrieve(created.id)).status != "in_progress":
                        await asyncio.sleep(0.02)
                    while True:
                        got = await _first_events(on_b, created.id, 11)
                        if len(got) == 11:
                            break
                a.proc.kill()  # kill -9: no drain, no last event; its owner key stops being renewed
                await a.proc.wait()
                events = [ev async for ev in await on_b.responses.retrieve(created.id, stream=True)]
                assert [ev.sequence_number for ev in events[:-1]] == list(range(11))
                assert events[-1].type == "error" and events[-1].code == "interrupted"
                after = await on_b.responses.retrieve(created.id)
                assert after.status == "failed" and after.error is not None and after.error.code == "interrupted"
            assert len(fake.bodies) == 1
            assert await stop(b) == 0
    finally:
        fake.go.set()
        notify_a.close()
        notify_b.close()


async def _first_events(sdk: Any, response_id: str, count: int) -> list[Any]:
    """Up to ``count`` events of a background response, read from its start and then let go."""
    out: list[Any] = []
    stream = await sdk.responses.retrieve(response_id, stream=True)
    try:
        async for ev in stream:
            out.append(ev)
            if len(out) == count:
                break
    finally:
        await stream.close()
    return out


async def test_a_producer_stopped_past_its_lease_gives_its_readers_the_same_single_end_as_readers_elsewhere(
        redis: Any, tmp_path: Path, upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    more = asyncio.Event()

    async def behaviour(request: web.Request, fake: FakeUpstream) -> web.StreamResponse:
        resp = await fake.start_stream(request)
        for part in ("one ", "two "):
            await fake.send(resp, sse(chunk(part)))
        await more.wait()  # set while the producer is stopped: these wait in its socket
        for part in ("three ", "four ", "five"):
            await fake.send(resp, sse(chunk(part)))
        await fake.send(resp, sse(chunk(None, finish_reason="stop")))
        await fake.send(resp, sse("[DONE]"))
        return resp

    upstream.behaviour = behaviour
    notify_a, notify_b = NotifyListener(), NotifyListener()
    try:
        async with spawn_relay(tmp_path, upstream, "--redis", redis.url, *FAST, "--redis-timeout", "0.2",
                               notify=notify_a) as a, \
                spawn_relay(tmp_path, upstream, "--redis", redis.url, *FAST, "--redis-timeout", "0.2",
                            notify=notify_b) as b:
            port_a = port_of(await notify_a.until("READY"))
            port_b = port_of(await notify_b.until("READY"))
            resp = await session.post(f"http://127.0.0.1:{port_a}/chat", json={"prompt": "hi"})
            local = SSEClient(resp)
            got = [await local.next() for _ in range(3)]
            assert all(e is not None for e in got)
            await in_redis(redis.url, got[2].id)
            location = resp.headers["Location"]
            far = await session.get(f"http://127.0.0.1:{port_b}{location}", headers={"Last-Event-ID": got[0].id})
            assert far.status == 200
            remote = SSEClient(far)
            assert [(await remote.next()).id for _ in range(2)] == [got[1].id, got[2].id]  # type: ignore[union-attr]
            os.kill(a.proc.pid, signal.SIGSTOP)  # stuck past its lease (--owner-ttl 0.6)
            try:
                rest_far = []
                while (event := await remote.next()) is not None:
                    rest_far.append(event)
                more.set()
                # The upstream's next chunks now sit in A's socket, unread.
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            rest_local = []
            while (event := await local.next()) is not None:
                rest_local.append(event)
            end = json.loads(rest_far[-1].data)
            assert (end["type"], end["code"], end["retriable"]) == ("error", "interrupted", True)
            # One stream, one ending: A's own reader gets the very event B's reader got, and not
            # one token A read from the upstream after its lease lapsed.
            assert [(e.id, e.data) for e in rest_local] == [(e.id, e.data) for e in rest_far]
            assert len(rest_far) == 1
            assert "ended elsewhere as interrupted" in a.output()
            assert "XADD" not in a.output()  # no stale write was attempted into the ended log
            assert await stop(a) == 0 and await stop(b) == 0
    finally:
        notify_a.close()
        notify_b.close()
