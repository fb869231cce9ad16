"""What both views check the same way: the relay's bounds on a request, the model, the roles.

The values a request carries are the upstream's to judge (it answers a 400 that the relay passes
on); what is checked here is what protects the operator: the model allowlist, the size of the
conversation, the output-token ceiling and ``n`` (every choice is billed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from relay.http.body import BadRequest

if TYPE_CHECKING:
    from relay.config import Config

#: The message roles of the chat-completions API; ``/v1`` also passes the deprecated ``function``.
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
V1_ROLES: Final = ROLES | {"function"}

#: Larger than any model's output, smaller than what breaks an upstream's 32-bit parser.
MAX_INT_TOKENS: Final = 2**31 - 1
MAX_MODEL_NAME: Final = 256


@dataclass(frozen=True, slots=True)
class RequestBounds:
    """The relay's own bounds on one request (docs/security.md); None: only the upstream's."""

    max_messages: int | None = None
    max_chars: int | None = None
    max_output_tokens: int | None = None
    max_n: int | None = None

    @classmethod
    def of(cls, config: Config) -> RequestBounds:
        return cls(max_messages=config.max_messages, max_chars=config.max_chars,
                   max_output_tokens=config.max_output_tokens, max_n=config.max_n)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def characters(value: Any) -> int:
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


def check_limits(body: dict[str, Any], messages: list[Any], limits: RequestBounds) -> None:
    """The relay's bounds: message count, characters, output tokens, ``n``; 400 naming the setting."""
    if limits.max_messages is not None and len(messages) > limits.max_messages:
        raise BadRequest(f"'messages' has {len(messages)} messages; this relay accepts at most "
                         f"{limits.max_messages} (--max-messages)", "messages")
    if limits.max_chars is not None:
        chars = characters(messages)
        if chars > limits.max_chars:
            raise BadRequest(f"the messages hold {chars} characters; this relay accepts at most "
                             f"{limits.max_chars} (--max-chars)", "messages")
    ceiling = limits.max_output_tokens or MAX_INT_TOKENS
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not is_int(value) or value < 1:
            raise BadRequest(f"'{key}' must be a positive integer", key)
        if value > ceiling:
            flag = " (--max-output-tokens)" if limits.max_output_tokens else ""
            raise BadRequest(f"'{key}' must be at most {ceiling}{flag}, not {value}", key)
    n = body.get("n")
    if n is not None:
        if not is_int(n) or n < 1:
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


