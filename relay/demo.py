"""Built-in OpenAI-compatible demo model, so `relay serve` works with no upstream configured.

It is served over real HTTP (not called in-process) so the relay exercises exactly the
same code path it uses for a real upstream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import uuid
from typing import Any

from aiohttp import web

from relay.jsoncodec import dumps

DEMO_MODEL = "relay-demo"

TOKEN_DELAY: web.AppKey[float] = web.AppKey("token_delay", float)

_QUOTE_LIMIT = 200
# Demo streams are disposable; a hung browser tab must not hold shutdown for aiohttp's 60 s default.
_SHUTDOWN_TIMEOUT = 2.0
# A word together with the whitespace before it, plus any trailing whitespace, so that
# "".join(tokens) reproduces the text exactly and newlines survive for Markdown rendering.
_TOKEN_RE = re.compile(r"\s*\S+|\s+")

log = logging.getLogger(__name__)


def _tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Non-text parts (images, audio) have nothing to echo, so they are skipped.
        return " ".join(
            p["text"] for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return _content_text(messages[-1].get("content"))


def compose_reply(prompt: str) -> str:
    """The deterministic answer to `prompt`, varied a little so Markdown rendering gets exercised."""
    words = prompt.split()
    flat = " ".join(words)  # newlines would break the inline quote
    if len(flat) > _QUOTE_LIMIT:
        flat = flat[:_QUOTE_LIMIT].rstrip() + "…"
    parts = [f"You said: “{flat}”." if words else "You sent an empty message."]
    parts.append(
        "This is the relay's built-in **demo model**: it is not a real language model, so it "
        "simply echoes your words back at a steady pace so you can see tokens stream."
    )
    if words:
        noun = "word" if len(words) == 1 else "words"
        extra = " It looks like a question, but I can't answer it." if flat.endswith("?") else ""
        parts.append(f"Your message had {len(words)} {noun}.{extra}")
    if re.search(r"\bcode\b", prompt, re.IGNORECASE):
        parts.append(
            "Since you mentioned code, here is a short block to show fences rendering:\n\n"
            "```python\ndef echo(message: str) -> str:\n    return message\n```"
        )
    parts.append(
        "Point the relay at a real OpenAI-compatible server with `--upstream` "
        "(or `OPENAI_BASE_URL`) to chat with an actual model."
    )
    return "\n\n".join(parts)


def _error(message: str, param: str | None, status: int = 400) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.json_response(body, status=status, dumps=dumps)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return _error("We could not parse the JSON body of your request.", None)
    if not isinstance(body, dict):
        return _error("The request body must be a JSON object.", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return _error("'messages' must be a non-empty array of message objects.", "messages")
    cap: int | None = None
    # max_completion_tokens is OpenAI's current name (max_tokens is deprecated), so it wins.
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is None:
            continue
        # bool is an int subclass; `true` is not a token count.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return _error(f"'{param}' must be a positive integer.", param)
        cap = value
        break
    requested = body.get("model")
    model = requested if isinstance(requested, str) and requested else DEMO_MODEL

    tokens = _tokenize(compose_reply(_last_user_text(messages)))
    finish_reason = "stop"
    if cap is not None and len(tokens) > cap:
        tokens, finish_reason = tokens[:cap], "length"
    prompt_tokens = sum(len(_tokenize(_content_text(m.get("content")))) for m in messages)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(obj: str, **rest: Any) -> dict[str, Any]:
        # Same key order as OpenAI, so raw captures diff cleanly against the real thing.
        return {"id": completion_id, "object": obj, "created": created, "model": model, **rest}

    if body.get("stream") is not True:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(tokens)},
            "finish_reason": finish_reason,
        }
        return web.json_response(envelope("chat.completion", choices=[choice], usage=usage), dumps=dumps)

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {dumps(envelope('chat.completion.chunk', choices=[choice]))}\n\n".encode()

    delay = request.app[TOKEN_DELAY]
    try:
        await response.write(chunk({"role": "assistant", "content": ""}, None))
        for token in tokens:
            # Pacing so a human can watch tokens arrive; not synchronisation.
            await asyncio.sleep(delay)
            await response.write(chunk({"content": token}, None))
        await response.write(chunk({}, finish_reason))
        if include_usage:
            payload = envelope("chat.completion.chunk", choices=[], usage=usage)
            await response.write(f"data: {dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        # The client went away between writes; handler cancellation usually gets there
        # first, but if not, stop quietly instead of logging a 500 nobody will receive.
        pass
    return response


def _input_text(value: Any) -> str:
    """The last user text of a Responses API ``input``: a string, or a list of items."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role", "user") == "user":
                content = item.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(p["text"] for p in content if isinstance(p, dict)
                                    and p.get("type") in ("input_text", "text") and isinstance(p.get("text"), str))
    return ""


async def _responses(request: web.Request) -> web.StreamResponse:
    """The Responses API, as OpenAI streams it: typed events with sequence numbers, no [DONE]."""
    try:
        body = await request.json()
    except ValueError:
        return _error("We could not parse the JSON body of your request.", None)
    if not isinstance(body, dict) or not (isinstance(body.get("input"), (str, list)) and body.get("input")):
        return _error("'input' must be a non-empty string or array of input items.", "input")
    cap = body.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        return _error("'max_output_tokens' must be a positive integer.", "max_output_tokens")
    model = body["model"] if isinstance(body.get("model"), str) and body["model"] else DEMO_MODEL
    tokens = _tokenize(compose_reply(_input_text(body["input"])))
    status, incomplete = "completed", None
    if cap is not None and len(tokens) > cap:
        tokens, status, incomplete = tokens[:cap], "incomplete", {"reason": "max_output_tokens"}
    text = "".join(tokens)
    input_tokens = len(_tokenize(_input_text(body["input"])))
    response_id, item_id, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": len(tokens), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + len(tokens)}

    def response_obj(state: str, output: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        return {"id": response_id, "object": "response", "created_at": created, "status": state,
                "error": None, "incomplete_details": incomplete if done else None, "model": model,
                "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": usage if done else None}

    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    if body.get("stream") is not True:
        return web.json_response(response_obj(status, [item], True), dumps=dumps)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    seq = 0

    async def send(kind: str, **fields: Any) -> None:
        nonlocal seq
        await response.write(f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"
                             .encode())
        seq += 1

    delay = request.app[TOKEN_DELAY]
    try:
        await send("response.created", response=response_obj("in_progress", [], False))
        await send("response.in_progress", response=response_obj("in_progress", [], False))
        await send("response.output_item.added", output_index=0,
                   item={**item, "status": "in_progress", "content": []})
        await send("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})
        for token in tokens:
            await asyncio.sleep(delay)  # pacing so a human can watch tokens arrive; not synchronisation
            await send("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=token)
        await send("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text)
        await send("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
        await send("response.output_item.done", output_index=0, item=item)
        await send(f"response.{status}", response=response_obj(status, [item], True))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away between writes
    return response


async def _models(request: web.Request) -> web.Response:
    model = {"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "relay"}
    return web.json_response({"object": "list", "data": [model]}, dumps=dumps)


def make_demo_app(*, token_delay: float = 0.03) -> web.Application:
    """POST /v1/chat/completions (stream true and false), GET /v1/models."""
    app = web.Application()
    app[TOKEN_DELAY] = token_delay
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/v1/models", _models)
    return app


async def start_demo_upstream(
    host: str = "127.0.0.1", port: int = 0, *, token_delay: float = 0.03
) -> tuple[web.AppRunner, str]:
    """Start the demo model on a real TCP socket; return (runner, base_url ending in /v1).

    The caller owns the runner and must `await runner.cleanup()`.
    """
    runner = web.AppRunner(
        make_demo_app(token_delay=token_delay),
        handler_cancellation=True,  # a client disconnect cancels generation
        shutdown_timeout=_SHUTDOWN_TIMEOUT,
        access_log=None,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"http://{bound_host}:{bound_port}/v1"


def run_demo_upstream(host: str, port: int, *, token_delay: float) -> None:
    """Blocking: serve the demo model until SIGINT/SIGTERM (`relay demo-upstream`)."""

    async def serve() -> None:
        runner, base_url = await start_demo_upstream(host, port, token_delay=token_delay)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
                pass
        try:
            log.info("Demo model %r serving at %s", DEMO_MODEL, base_url)
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
