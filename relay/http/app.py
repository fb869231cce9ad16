"""``make_app(config)``: routes, static files, the shared ClientSession, startup and shutdown."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from relay.config import Config
from relay.core.redis_store import open_store
from relay.core.registry import Registry
from relay.demo import DEMO_MODEL, start_demo_upstream
from relay.http import chat, guard, openai, responses, static
from relay.http.appkeys import ACCESS, CATALOG, CONFIG, DISCONNECTS, LIMITS, METRICS, PROBE, REGISTRY, STORE, UPSTREAMS
from relay.http.crashes import handler_crashes
from relay.http.disconnects import Disconnects
from relay.http.errors import openai_route_errors
from relay.http.health import ReadinessProbe, healthz, readyz, upstreams_state
from relay.http.metrics_listener import make_metrics, metrics_ctx
from relay.upstream.catalog import Catalog
from relay.upstream.pool import Pool, shortcut_spec
from relay.upstream.session import make_session

log = logging.getLogger("relay")

#: The page, shipped inside the package (package data: a wheel, a pipx or a checkout install alike).
DEFAULT_WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

#: Sent with the page and its files: no inline script or style, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def make_app(config: Config, *, clock: Callable[[], float] = time.monotonic,
             rng: random.Random | None = None) -> web.Application:
    """The relay; ``clock`` and ``rng`` are the upstream pool's (cooldowns, weighted choice), for tests."""
    # client_max_size bounds the body aiohttp will read for us; handlers turn its 413 into ours.
    app = web.Application(client_max_size=config.max_body)
    app[CONFIG] = config
    app[METRICS] = make_metrics(config)
    app[DISCONNECTS] = Disconnects()
    app.middlewares.append(handler_crashes)  # the outermost: a crash anywhere inside is logged as ours
    guard.install(app)  # Host, Origin, tokens, rate limit, nosniff: relay/http/guard.py
    app.middlewares.append(openai_route_errors)  # inside the guard: a refused request stays refused
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(functools.partial(_upstream_ctx, clock=clock, rng=rng))
    app.cleanup_ctx.append(metrics_ctx)
    app.on_shutdown.append(_end_generations)
    app.router.add_post("/chat", chat.post_chat, expect_handler=guard.expect_handler)
    app.router.add_get("/chat", chat.get_chat, allow_head=False)
    app.router.add_get("/chat/{id}", chat.get_stream, allow_head=False)
    app.router.add_delete("/chat/{id}", chat.delete_stream)
    app.router.add_post("/v1/chat/completions", openai.chat_completions, expect_handler=guard.expect_handler)
    app.router.add_post("/v1/responses", responses.create_response, expect_handler=guard.expect_handler)
    app.router.add_get("/v1/responses/{id}", responses.retrieve_response, allow_head=False)
    app.router.add_post("/v1/responses/{id}/cancel", responses.cancel_response)
    app.router.add_delete("/v1/responses/{id}", responses.delete_response)
    app.router.add_get("/v1/responses/{id}/input_items", responses.input_items, allow_head=False)
    app.router.add_get("/v1/models", openai.list_models, allow_head=False)
    app.router.add_get("/v1/models/{model}", openai.get_model, allow_head=False)
    app.router.add_get("/v1/upstreams", upstreams_state, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    web_root = config.web_root or (DEFAULT_WEB_ROOT if (DEFAULT_WEB_ROOT / "index.html").is_file() else None)
    if web_root is None:
        # One line at start, not a silent 404 at every visit (an install that left the page behind).
        log.warning("the chat page is missing (no index.html in %s): GET / answers 404; the API is unaffected",
                    DEFAULT_WEB_ROOT)
    else:
        index = web_root / "index.html"

        favicon = web_root / "favicon.svg"

        async def page(_request: web.Request) -> web.StreamResponse:
            return web.FileResponse(index)

        async def favicon_ico(_request: web.Request) -> web.StreamResponse:
            # Browsers ask for /favicon.ico whatever the page links; the SVG answers (by its content type).
            if not favicon.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(favicon)
        app.router.add_get("/", page)
        app.router.add_get("/favicon.ico", favicon_ico)
        app.router.add_get("/static/{path:.*}", static.handler(web_root), allow_head=True)
        app.on_response_prepare.append(_page_headers)
    return app


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    path = request.path
    if path == "/" or path == "/favicon.ico" or path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)


async def _upstream_ctx(app: web.Application, *, clock: Callable[[], float],
                        rng: random.Random | None) -> AsyncIterator[None]:
    config = app[CONFIG]
    demo_runner: web.AppRunner | None = None
    default_model: str | None = config.model
    if config.upstreams:
        specs = list(config.upstreams)
        log.info("relaying to %d upstreams: %s", len(specs), ", ".join(spec.name for spec in specs))
    elif config.upstream is None:
        demo_runner, base_url = await start_demo_upstream(token_delay=config.demo_token_delay)
        log.info("no upstream configured: relaying through the built-in demo model at %s", base_url)
        default_model = config.model or DEMO_MODEL
        specs = [shortcut_spec(config, base_url, name="demo")]
    else:
        log.info("relaying to %s", config.upstream)
        specs = [shortcut_spec(config, config.upstream)]
    session = make_session(config)
    pool = Pool.build(session, config, specs, clock=clock, rng=rng)
    pool.metrics = metrics = app[METRICS]
    app[UPSTREAMS] = pool
    app[CATALOG] = Catalog.of(pool, default_model=default_model, allowed=config.models, demo=config.demo)
    if default_model is None:
        log.info("no default model (--model): every request must name a model, and the page asks its user to pick one")
    store = app[STORE]
    app[REGISTRY] = registry = Registry(config, pool, store, metrics)
    store.attach(registry, metrics, pool)
    app[PROBE] = ReadinessProbe(pool)
    try:
        yield
    finally:
        # The registry was closed by _end_generations, before aiohttp waited for the handlers.
        await app[PROBE].close()
        await session.close()
        if demo_runner is not None:
            await demo_runner.cleanup()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shared store when --redis is given (relay/core/redis_store.py), else the memory one."""
    config = app[CONFIG]
    store = open_store(config)
    await store.start()
    app[STORE] = store
    app[LIMITS].shared = store.limits()
    if config.signing_key is None and (secret := await store.signing_secret()) is not None:
        # Every instance must verify every other's events URLs: one secret, kept in the store.
        app[ACCESS].use_secret(secret)
    if config.signing_key is not None:
        app[ACCESS].use_secret(config.signing_key)
    try:
        yield
    finally:
        # After the upstream context (cleanup runs in reverse): the shutdown ends are written.
        await store.close()


async def _end_generations(app: web.Application) -> None:
    # The one place generations end at shutdown (relay/run/server.py drains them first).  It
    # runs before aiohttp waits for the handlers: each generation still running ends with a
    # retriable ``shutdown`` error, so the handlers following it send that and finish.
    await app[REGISTRY].close()
