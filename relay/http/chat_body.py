"""Checks a ``/chat`` request body and turns it into the upstream request body.

Every rejection is a ``BadRequest`` whose message names the field and the problem, so a
person reading a 400 knows what to change.
"""

from __future__ import annotations

from typing import Any, Final

from relay.http.body import BadRequest
from relay.http.fields import CHAT_FIELDS, check_chat_field
from relay.http.params import ROLES, RequestBounds, check_limits, check_model

MESSAGE_FIELDS: Final = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRequest("'messages' must be a list of message objects", "messages")
    if not value:
        raise BadRequest("'messages' must not be empty", "messages")
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'", where)
        for key in msg:
            if key not in MESSAGE_FIELDS:
                raise BadRequest(f"'{where}.{key}' is not a supported message field", f"{where}.{key}")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = msg.get("content")
        if content is None:
            if not (role == "assistant" and msg.get("tool_calls")):
                raise BadRequest(f"'{where}.content' is required", f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise BadRequest(f"'{where}.content[{j}]' must be an object with a 'type'",
                                     f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string or a list of content parts",
                             f"{where}.content")
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            raise BadRequest(f"'{where}.tool_calls' must be a list", f"{where}.tool_calls")
        for key in ("name", "tool_call_id"):
            if key in msg and not isinstance(msg[key], str):
                raise BadRequest(f"'{where}.{key}' must be a string", f"{where}.{key}")
    return value


def chat_request(body: Any, *, default_model: str | None, stream_usage: bool,
                 models: tuple[str, ...] = (), limits: RequestBounds = RequestBounds()) -> tuple[str, dict[str, Any]]:
    """A /chat body → (model, upstream request body with ``stream: true``)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'messages' or 'prompt'")
    for key in body:
        if key not in CHAT_FIELDS:
            check_chat_field(key, body[key])  # raises, naming the field and why
    if ("messages" in body) == ("prompt" in body):
        raise BadRequest("send exactly one of 'messages' or 'prompt'", "messages")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    else:
        if isinstance(body["messages"], list):
            check_limits({}, body["messages"], limits)  # before walking 10,000 messages one by one
        messages = _messages(body["messages"])
    check_limits(body, messages, limits)
    model = check_model(body, default_model, models)
    out: dict[str, Any] = {"model": model, "messages": messages}
    for key, value in body.items():
        if key not in ("messages", "prompt", "model"):
            check_chat_field(key, value)
            out[key] = value
    out["stream"] = True
    if stream_usage:
        out["stream_options"] = {"include_usage": True}
    return model, out
