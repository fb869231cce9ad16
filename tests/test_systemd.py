"""The systemd protocol: sd_notify, the watchdog and socket activation, against a real `relay serve` process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
from pathlib import Path

import aiohttp
import pytest

from conftest import FakeUpstream, SSEClient, text_of, tokens
from procs import NotifyListener, first_delta_then_wait, listening_socket, port_of, spawn_relay
from relay.run import systemd



# -- the protocol, in process ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_one_datagram_to_a_path_or_abstract_socket(kind: str) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        if kind == "path":
            address = bind = os.path.join(tmp, "notify")
        else:
            address, bind = f"@relay-unit-{os.getpid()}", f"\0relay-unit-{os.getpid()}"
        receiver.bind(bind)
        assert systemd.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": address})
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_is_a_no_op_outside_systemd() -> None:
    assert systemd.notify("READY=1", {}) is False


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
], ids=["usec-only", "our-pid", "another-pid", "zero", "unset", "malformed"])
def test_watchdog_pings_at_half_the_interval_and_only_for_our_pid(environ: dict[str, str],
                                                                 expected: float | None) -> None:
    assert systemd.watchdog_interval(environ) == expected


def test_listen_sockets_meant_for_another_process_are_ignored_and_the_variables_unset() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "relay.socket", "X": "y"}
    assert systemd.listen_sockets(environ) == []
    assert environ == {"X": "y"}


# -- a real `relay serve` process --------------------------------------------------------------

async def test_ready_is_sent_only_once_the_port_accepts(tmp_path: Path, upstream: FakeUpstream,
                                                        notify: NotifyListener) -> None:
    async with spawn_relay(tmp_path, upstream, notify=notify) as relay:
        ready = await notify.until("READY")
        assert ready["READY"] == "1"
        # Right after READY=1, with no retry: a connect that is refused fails the test.
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(ready))
        writer.close()
        await writer.wait_closed()
        assert relay.proc.returncode is None


async def test_watchdog_pings_keep_coming_while_streams_run(tmp_path: Path, upstream: FakeUpstream,
                                                           notify: NotifyListener) -> None:
    gates: dict[str, asyncio.Event] = {}
    upstream.behaviour = first_delta_then_wait(gates)
    # WATCHDOG_PID names the relay process itself (set by the wrapper once the pid is known).
    async with spawn_relay(tmp_path, upstream, notify=notify, env={"WATCHDOG_USEC": "200000"},
                           pid_vars=("WATCHDOG_PID",)) as relay, aiohttp.ClientSession() as session:
        port = port_of(await notify.until("READY"))
        async with session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "slow"}) as resp:
            client = SSEClient(resp)
            assert (await client.next_json() or {})["type"] == "start"
            assert await client.next_json() == {"type": "delta", "content": "slow"}
            # The stream is running (its upstream is paused): the loop must keep pinging.
            for _ in range(3):
                assert (await notify.until("WATCHDOG"))["WATCHDOG"] == "1"
            gates["slow"].set()
            events = await client.all()
        assert events[-1]["type"] == "done", relay.output()


async def test_sigterm_says_stopping_and_exits_0(tmp_path: Path, upstream: FakeUpstream,
                                                 notify: NotifyListener) -> None:
    async with spawn_relay(tmp_path, upstream, notify=notify) as relay:
        await notify.until("READY")
        relay.proc.send_signal(signal.SIGTERM)
        assert (await notify.until("STOPPING"))["STOPPING"] == "1"
        assert await relay.exit_status() == 0, relay.output()


async def test_chat_is_served_on_a_socket_inherited_from_systemd(tmp_path: Path, upstream: FakeUpstream,
                                                                 notify: NotifyListener) -> None:
    upstream.behaviour = tokens(["through ", "fd 3"])
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with spawn_relay(tmp_path, upstream, notify=notify, listen=sock) as relay, \
                aiohttp.ClientSession() as session:
            ready = await notify.until("READY")
            assert "socket-activated" in ready["STATUS"] and port_of(ready) == port, relay.output()
            async with session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"}) as resp:
                events = await SSEClient(resp).all()
            assert text_of(events) == "through fd 3" and events[-1]["type"] == "done"


async def test_the_key_comes_from_the_systemd_credential_and_stays_out_of_the_log(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    credentials = tmp_path / "credentials"  # what LoadCredential=openai-api-key:... provides
    credentials.mkdir()
    (credentials / "openai-api-key").write_text("sk-from-credential-0123456789\n")
    async with spawn_relay(tmp_path, upstream, notify=notify,
                           env={"CREDENTIALS_DIRECTORY": str(credentials)}) as relay, \
            aiohttp.ClientSession() as session:
        port = port_of(await notify.until("READY"))
        async with session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": "hi"}) as resp:
            assert (await SSEClient(resp).all())[-1]["type"] == "done"
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.exit_status() == 0
    assert upstream.headers[0]["Authorization"] == "Bearer sk-from-credential-0123456789"
    assert "sk-from-credential" not in relay.output()
