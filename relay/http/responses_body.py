"""Checks a ``POST /v1/responses`` body (OpenAI's Responses API) and turns it into the upstream's.

As for chat completions, fields go on as sent; what the relay checks is what it relies on or
guards: ``model`` (the default, the allowlist), ``input`` (its size, against --max-messages and
--max-chars), ``stream``, the output-token ceiling (--max-output-tokens is ``max_output_tokens``
here, added when the request names none) and ``background``: a background answer is the relay's
own (relay/http/responses.py), so the upstream is asked for an ordinary streamed answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.http.body import BadRequest
from relay.http.params import MAX_INT_TOKENS, RequestBounds, characters, check_model, is_int


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    model: str
    #: What the relay sends upstream.
    body: dict[str, Any]
    stream: bool
    #: Kept and resumable by the relay, running on when the client leaves.
    background: bool = False


def responses_request(body: Any, *, default_model: str | None, models: tuple[str, ...],
                      limits: RequestBounds = RequestBounds()) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'input' and 'model'")
    data = body.get("input")
    if not (isinstance(data, str) and data) and not (isinstance(data, list) and data):
        raise BadRequest("'input' must be a non-empty string or a non-empty list of input items", "input")
    if isinstance(data, list) and limits.max_messages is not None and len(data) > limits.max_messages:
        raise BadRequest(f"'input' has {len(data)} items; this relay accepts at most {limits.max_messages} "
                         "(--max-messages)", "input")
    chars = characters(data) + characters(body.get("instructions"))
    if limits.max_chars is not None and chars > limits.max_chars:
        raise BadRequest(f"the input holds {chars} characters; this relay accepts at most {limits.max_chars} "
                         "(--max-chars)", "input")
    model = check_model(body, default_model, models)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be true or false", "stream")
    background = body.get("background", False)
    if not isinstance(background, bool) and background is not None:
        raise BadRequest("'background' must be true or false", "background")
    out = dict(body)
    if background:
        # The relay keeps and resumes it; the upstream streams it as any other answer (an upstream
        # without a background mode, such as vLLM, serves it all the same).
        del out["background"]
        out["stream"] = True
    out["model"] = model
    ceiling = limits.max_output_tokens
    tokens = body.get("max_output_tokens")
    if tokens is not None:
        if not is_int(tokens) or tokens < 1:
            raise BadRequest("'max_output_tokens' must be a positive integer", "max_output_tokens")
        if tokens > (ceiling or MAX_INT_TOKENS):
            flag = " (--max-output-tokens)" if ceiling else ""
            raise BadRequest(f"'max_output_tokens' must be at most {ceiling or MAX_INT_TOKENS}{flag}, not {tokens}",
                             "max_output_tokens")
    elif ceiling is not None:
        out["max_output_tokens"] = ceiling
    return ResponsesRequest(model=model, body=out, stream=bool(stream), background=bool(background))


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's ``input`` as the input items OpenAI lists for it (``/input_items``): a string is
    one user message; a message given in the short form (``role`` and ``content``) gets its
    ``type`` and its text as a content part; every item gets an id if it has none."""
    import secrets

    data = body.get("input")
    raw: list[Any] = [{"role": "user", "content": data}] if isinstance(data, str) else list(data or [])
    items: list[dict[str, Any]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        item = dict(entry)
        if "type" not in item and "role" in item:
            item["type"] = "message"
        if item.get("type") == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if not isinstance(item.get("id"), str):
            item["id"] = f"msg_{secrets.token_hex(16)}"
        items.append(item)
    return items
