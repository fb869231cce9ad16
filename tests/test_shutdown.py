"""SIGTERM with streams in flight: drain, then a retriable `shutdown`; a restart on the same socket loses nothing."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import FakeUpstream, SSEClient, text_of, wait_for
from procs import NotifyListener, first_delta_then_wait, listening_socket, spawn_relay

V1 = "/v1/chat/completions"


def v1_body(prompt: str) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], "stream": True}


async def open_stream(session: aiohttp.ClientSession, port: int, prompt: str) -> SSEClient:
    """POST /chat and read up to the prompt's first delta: the stream is then in flight."""
    resp = await session.post(f"http://127.0.0.1:{port}/chat", json={"prompt": prompt})
    client = SSEClient(resp)
    assert (await client.next_json() or {})["type"] == "start"
    assert await client.next_json() == {"type": "delta", "content": prompt}
    return client


async def open_v1(session: aiohttp.ClientSession, port: int, prompt: str) -> SSEClient:
    """A streaming /v1 request read up to the prompt's delta: in flight."""
    client = SSEClient(await session.post(f"http://127.0.0.1:{port}{V1}", json=v1_body(prompt)))
    assert client.resp.status == 200
    while True:
        event = await client.next()
        assert event is not None
        if json.loads(event.data)["choices"][0]["delta"].get("content") == prompt:
            return client


def v1_text(datas: list[str]) -> str:
    return "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                   for d in datas if d != "[DONE]" and json.loads(d).get("choices"))


def last_event_block(client: SSEClient) -> str:
    """The raw text of the final event, fields and all (to see its retry: line)."""
    return [block for block in client.raw.decode().split("\n\n") if block.strip()][-1]


def assert_retriable_shutdown(client: SSEClient, events: list[dict[str, Any]], retry_ms: int) -> None:
    assert events[-1]["type"] == "error" and events[-1]["code"] == "shutdown"
    assert events[-1]["retriable"] is True
    assert f"retry: {retry_ms}" in last_event_block(client).splitlines()
    assert [e["type"] for e in events].count("error") == 1


async def test_sigterm_lets_streams_in_flight_finish_then_ends_the_rest_with_shutdown(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    gates: dict[str, asyncio.Event] = {}
    upstream.behaviour = first_delta_then_wait(gates)
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with spawn_relay(tmp_path, upstream, "--drain-timeout", "600", "--retry-ms", "1234",
                               notify=notify, listen=sock) as relay, aiohttp.ClientSession() as session:
            await notify.until("READY")
            fits = await open_stream(session, port, "fits")
            late = await open_stream(session, port, "late")
            relay.proc.send_signal(signal.SIGTERM)
            await notify.until("STOPPING")
            # Draining: the stream whose upstream finishes now completes normally.
            gates["fits"].set()
            fits_events = await fits.all()
            assert fits_events[-1] == {"type": "done", "finish_reason": "stop", "usage": None}
            assert text_of(fits_events) == " done"  # after the delta open_stream read
            # The other never finishes; a second SIGTERM ends the drain (as the timeout would).
            assert relay.proc.returncode is None
            relay.proc.send_signal(signal.SIGTERM)
            late_events = await late.all()
            assert_retriable_shutdown(late, late_events, 1234)
            assert await relay.exit_status() == 0, relay.output()
            await wait_for(upstream.closed.is_set)  # the upstream request was closed, not left running


async def test_streams_still_running_at_the_drain_timeout_end_with_retriable_shutdown(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    upstream.behaviour = first_delta_then_wait({})  # never released
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with spawn_relay(tmp_path, upstream, "--drain-timeout", "0.2", notify=notify, listen=sock) as relay, \
                aiohttp.ClientSession() as session:
            await notify.until("READY")
            clients = [await open_stream(session, port, f"stuck {i}") for i in range(3)]
            relay.proc.send_signal(signal.SIGTERM)
            for client in clients:
                assert_retriable_shutdown(client, await client.all(), 2000)
            assert await relay.exit_status() == 0, relay.output()


async def test_restart_on_the_same_socket_serves_connections_made_during_the_drain(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    gates: dict[str, asyncio.Event] = {}
    seen: list[str] = []
    upstream.behaviour = first_delta_then_wait(gates, seen=seen)
    gates["during restart"] = asyncio.Event()
    gates["during restart"].set()
    # The test holds the listening socket the way systemd does (relay.socket).
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with aiohttp.ClientSession() as session:
            async with spawn_relay(tmp_path, upstream, "--drain-timeout", "600", notify=notify,
                                   listen=sock) as old:
                await notify.until("READY")
                in_flight = await open_stream(session, port, "in flight")
                old.proc.send_signal(signal.SIGTERM)
                await notify.until("STOPPING")
                # The old process no longer accepts; this connect waits in the kernel's queue.
                late = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/chat",
                                                        json={"prompt": "during restart"}))
                gates["in flight"].set()
                assert (await in_flight.all())[-1]["type"] == "done"
                assert await old.exit_status() == 0, old.output()
                assert seen == ["in flight"] and not late.done()
            async with spawn_relay(tmp_path, upstream, notify=notify, listen=sock) as new:
                async with asyncio.timeout(30):
                    resp = await late
                events = await SSEClient(resp).all()
                assert text_of(events) == "during restart done", new.output()
                assert events[-1]["type"] == "done"
                assert seen == ["in flight", "during restart"]


@pytest.mark.parametrize("with_chat", [True, False], ids=["v1-outlasts-chat", "v1-alone"])
async def test_sigterm_lets_a_v1_stream_in_flight_finish_like_a_chat_stream(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener, with_chat: bool) -> None:
    gates: dict[str, asyncio.Event] = {}
    upstream.behaviour = first_delta_then_wait(gates)
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with spawn_relay(tmp_path, upstream, "--drain-timeout", "600", notify=notify, listen=sock) as relay, \
                aiohttp.ClientSession() as session:
            await notify.until("READY")
            chat = await open_stream(session, port, "chat") if with_chat else None
            v1 = await open_v1(session, port, "v1")
            relay.proc.send_signal(signal.SIGTERM)
            await notify.until("STOPPING")
            if chat is not None:
                gates["chat"].set()
                assert (await chat.all())[-1] == {"type": "done", "finish_reason": "stop", "usage": None}
            # The /v1 stream is still draining, not cut.
            assert relay.proc.returncode is None
            gates["v1"].set()
            rest = await v1.all_data()
            assert rest[-1] == "[DONE]" and v1_text(rest) == " done", rest
            assert not any("error" in json.loads(d) for d in rest if d != "[DONE]")
            assert await relay.exit_status() == 0, relay.output()


async def test_a_v1_stream_still_running_at_the_drain_timeout_ends_with_an_in_stream_shutdown_error(
        tmp_path: Path, upstream: FakeUpstream, notify: NotifyListener) -> None:
    upstream.behaviour = first_delta_then_wait({})  # never released
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        async with spawn_relay(tmp_path, upstream, "--drain-timeout", "0.2", notify=notify, listen=sock) as relay, \
                aiohttp.ClientSession() as session:
            await notify.until("READY")
            v1 = await open_v1(session, port, "stuck")
            relay.proc.send_signal(signal.SIGTERM)
            assert [json.loads(d)["error"]["code"] for d in await v1.all_data()] == ["shutdown"]  # and no [DONE]
            assert await relay.exit_status() == 0, relay.output()
            await wait_for(upstream.closed.is_set)


def test_drain_timeout_is_a_setting_with_a_flag_and_rejects_negatives() -> None:
    from relay.run.cli import config_from_args
    from relay.run.flags import build_parser
    from relay.config import ConfigError

    args = build_parser().parse_args(["serve", "--drain-timeout", "7.5"])
    assert config_from_args(args, {}).drain_timeout == 7.5
    assert config_from_args(build_parser().parse_args(["serve"]), {"RELAY_DRAIN_TIMEOUT": "0"}).drain_timeout == 0
    with pytest.raises(ConfigError, match="--drain-timeout"):
        config_from_args(build_parser().parse_args(["serve", "--drain-timeout", "-1"]), {})

