"""Each private member of aiohttp the relay uses (relay/aiohttp_internals.py), checked by name on a
real server and connection: an aiohttp release that renames or changes one fails here, loudly,
instead of switching a feature off (the behaviours themselves are pinned where they are used:
tests/test_connections.py, tests/test_direct_write.py, tests/test_cancel_burst.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import StreamWriter
from aiohttp.web_protocol import RequestHandler

from relay import aiohttp_internals as internals


async def serve(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def test_server_connection_hooks_run_in_the_documented_order() -> None:
    calls: list[str] = []
    lost_seen = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    runner, port = await serve(handler)
    try:
        assert runner.server is not None
        internals.install_connection_hooks(
            runner.server, made=(lambda h, t: calls.append(f"made {type(h).__name__}"),),
            before_lost=(lambda h, e: calls.append("before_lost"),),
            after_lost=(lambda h, e: (calls.append("after_lost"), lost_seen.set()),))
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
            assert await resp.text() == "ok"
        async with asyncio.timeout(10):
            await lost_seen.wait()
        assert calls == ["made RequestHandler", "before_lost", "after_lost"]
    finally:
        await runner.cleanup()


async def test_request_handler_parser_waiter_messages_and_keepalive_close_time() -> None:
    handlers: list[RequestHandler] = []

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    runner, port = await serve(handler)
    try:
        assert runner.server is not None
        internals.install_connection_hooks(runner.server, made=(lambda h, t: handlers.append(h),))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                while b"ok" not in await reader.read(4096):
                    pass
            handler_ = handlers[0]
            # _parser: replaceable, and fed the connection's bytes (feed_data -> (messages, upgraded, tail)).
            parser = internals.request_parser(handler_)
            fed: list[bytes] = []

            class Spy:
                def feed_data(self, data: bytes) -> Any:
                    fed.append(data)
                    return parser.feed_data(data)

                def __getattr__(self, name: str) -> Any:
                    return getattr(parser, name)

            internals.replace_request_parser(handler_, Spy())
            # _waiter, _messages: between requests, aiohttp awaits the next one.
            async with asyncio.timeout(10):
                while not internals.waits_for_a_request(handler_):
                    await asyncio.sleep(0.01)
            # _next_keepalive_close_time: armed after the answer, in the future, within the timeout.
            close = internals.keepalive_close_time(handler_)
            now = asyncio.get_running_loop().time()
            assert now < close <= now + 30
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                while b"ok" not in await reader.read(4096):
                    pass
            assert fed and fed[0].startswith(b"GET / HTTP/1.1")
        finally:
            writer.close()
    finally:
        await runner.cleanup()


async def test_stream_writer_write_completes_in_one_step_on_a_server_response() -> None:
    written: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        writer = await resp.prepare(request)
        assert isinstance(writer, StreamWriter)
        written.append(internals.write_now(writer, b"now"))
        await resp.write_eof()
        return resp

    runner, port = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
            assert await resp.read() == b"now"
        assert written == [True]
    finally:
        await runner.cleanup()
