"""Checks a /chat request body and turns it into the upstream request body.

Every rejection is a ``BadRequest`` whose message names the field and the problem, so a
person reading a 400 knows what to change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from relay.config import Config

ALLOWED_FIELDS: Final = frozenset({
    "messages", "prompt", "model", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stop", "seed", "tools", "tool_choice",
})
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
MESSAGE_FIELDS: Final = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


#: Larger than any model's output, smaller than what breaks an upstream's 32-bit parser.
MAX_INT_TOKENS: Final = 2**31 - 1
MAX_MODEL_NAME: Final = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """The relay's own bounds on one request (docs/security.md); None: only the upstream's."""

    max_messages: int | None = None
    max_chars: int | None = None
    max_output_tokens: int | None = None
    max_n: int | None = None

    @classmethod
    def of(cls, config: Config) -> Limits:
        return cls(max_messages=config.max_messages, max_chars=config.max_chars,
                   max_output_tokens=config.max_output_tokens, max_n=config.max_n)


class BadRequest(ValueError):
    """The request is wrong; ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object with 'messages' or 'prompt'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


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


def _characters(value: Any) -> int:
    """Characters in every string inside ``value`` (iterative: the JSON may be nested deeply)."""
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return total


def check_limits(body: dict[str, Any], messages: list[Any], limits: Limits) -> None:
    """The relay's bounds: message count, characters, output tokens, ``n``; 400 naming the setting."""
    if limits.max_messages is not None and len(messages) > limits.max_messages:
        raise BadRequest(f"'messages' has {len(messages)} messages; this relay accepts at most "
                         f"{limits.max_messages} (--max-messages)", "messages")
    if limits.max_chars is not None:
        chars = _characters(messages)
        if chars > limits.max_chars:
            raise BadRequest(f"the messages hold {chars} characters; this relay accepts at most "
                             f"{limits.max_chars} (--max-chars)", "messages")
    ceiling = limits.max_output_tokens or MAX_INT_TOKENS
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise BadRequest(f"'{key}' must be a positive integer", key)
        if value > ceiling:
            flag = " (--max-output-tokens)" if limits.max_output_tokens else ""
            raise BadRequest(f"'{key}' must be at most {ceiling}{flag}, not {value}", key)
    n = body.get("n")
    if n is not None:
        if not _is_int(n) or n < 1:
            raise BadRequest("'n' must be a positive integer", "n")
        if limits.max_n is not None and n > limits.max_n:
            raise BadRequest(f"'n' must be at most {limits.max_n} (--max-n): each choice is billed", "n")


def check_model(body: dict[str, Any], default_model: str | None, models: tuple[str, ...]) -> str:
    """The model the request names (or the default); 400 naming it when the allowlist excludes it."""
    model = body.get("model", default_model)
    if model is None:
        raise BadRequest("'model' is required: this relay has no default model (--model)", "model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string", "model")
    if len(model) > MAX_MODEL_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in model):
        # It travels in events and log lines: no line breaks, NULs or other control characters.
        raise BadRequest(f"'model' must be a name of at most {MAX_MODEL_NAME} characters without control "
                         "characters (line breaks, NUL)", "model")
    if models and model not in models:
        raise BadRequest(f"the model '{model}' is not available on this relay; available: {', '.join(models)}",
                         "model")
    return model


def chat_request(body: Any, *, default_model: str | None, stream_usage: bool,
                 models: tuple[str, ...] = (), limits: Limits = Limits()) -> tuple[str, dict[str, Any]]:
    """A /chat body → (model, upstream request body with ``stream: true``)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'messages' or 'prompt'")
    for key in body:
        if key not in ALLOWED_FIELDS:
            raise BadRequest(f"'{key}' is not a supported field; supported: {', '.join(sorted(ALLOWED_FIELDS))}",
                             key)
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
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        if key in body:
            if not _is_number(body[key]) or not low <= body[key] <= high:
                raise BadRequest(f"'{key}' must be a number from {low} to {high}", key)
            out[key] = body[key]
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body:
            if not _is_int(body[key]) or body[key] < 1:
                raise BadRequest(f"'{key}' must be a positive integer", key)
            out[key] = body[key]
    if "seed" in body:
        if not _is_int(body["seed"]):
            raise BadRequest("'seed' must be an integer", "seed")
        out["seed"] = body["seed"]
    if "stop" in body:
        stop = body["stop"]
        if not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                          and all(isinstance(s, str) for s in stop))):
            raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
        out["stop"] = stop
    if "tools" in body:
        tools = body["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRequest("'tools' must be a list of tool objects", "tools")
        out["tools"] = tools
    if "tool_choice" in body:
        if not isinstance(body["tool_choice"], (str, dict)):
            raise BadRequest("'tool_choice' must be a string or an object", "tool_choice")
        out["tool_choice"] = body["tool_choice"]
    out["stream"] = True
    if stream_usage:
        out["stream_options"] = {"include_usage": True}
    return model, out
