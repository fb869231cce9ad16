"""Safe by default, as a real `relay serve` process: the refusal to listen openly, and SIGHUP."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp

from conftest import TEST_KEY, FakeUpstream
from procs import NotifyListener, listening_socket, port_of, spawn_relay

KEEP = "tok-keep-" + "k" * 24
DROP = "tok-drop-" + "d" * 24



async def test_a_non_loopback_host_without_tokens_exits_2_with_one_line_saying_why(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    # Refused while reading the settings, before anything is bound.
    async with spawn_relay(tmp_path, upstream, "--host", "0.0.0.0") as relay:
        assert await relay.exit_status() == 2
        lines = relay.output().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("relay: error: refusing to listen on 0.0.0.0 without access control")
    assert "--tokens-file" in lines[0] and "--allow-anonymous" in lines[0]


async def test_allow_anonymous_lets_it_start(tmp_path: Path, upstream: FakeUpstream,
                                             notify: NotifyListener) -> None:
    # The listening socket comes from the test (as systemd would hand it over) and is loopback:
    # the tests never listen beyond 127.0.0.1.
    with listening_socket() as sock:
        async with spawn_relay(tmp_path, upstream, "--host", "0.0.0.0", "--allow-anonymous", notify=notify,
                               listen=sock) as relay, aiohttp.ClientSession() as session:
            port = port_of(await notify.until("READY"))
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200, relay.output()


async def test_an_unreadable_tokens_file_exits_2_naming_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    missing = tmp_path / "no-such-tokens"
    async with spawn_relay(tmp_path, upstream, "--tokens-file", str(missing)) as relay:
        assert await relay.exit_status() == 2
        assert f"relay: error: cannot read the tokens file '{missing}'" in relay.output()


async def test_sighup_rereads_the_tokens_and_a_broken_file_keeps_the_old_ones(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{KEEP}\n{DROP}\n")
    async with spawn_relay(tmp_path, upstream, "--tokens-file", str(tokens), notify=notify) as relay, \
            aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port_of(await notify.until('READY'))}/v1/models"

        async def status(token: str) -> int:
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                return resp.status

        assert (await status(KEEP), await status(DROP)) == (200, 200)
        tokens.write_text(f"# {DROP} was removed\n{KEEP}\n")
        relay.proc.send_signal(signal.SIGHUP)
        # systemd's notify-reload protocol: RELOADING=1, then READY=1 once the reload is done.
        assert "MONOTONIC_USEC" in await notify.until("RELOADING")
        await notify.until("READY")
        assert (await status(KEEP), await status(DROP)) == (200, 401)

        tokens.unlink()
        relay.proc.send_signal(signal.SIGHUP)
        await notify.until("RELOADING")
        await notify.until("READY")
        assert await status(KEEP) == 200
        assert relay.proc.returncode is None
    output = relay.output()
    assert "tokens not reloaded, the previous 1 stay in force: cannot read the tokens file" in output
    for secret in (KEEP, DROP, TEST_KEY):
        assert secret not in output
