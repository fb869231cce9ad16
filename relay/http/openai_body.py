"""Checks a ``/v1/chat/completions`` body and turns it into the upstream request body.

Every field is forwarded as sent (the documented parameters and vendors' own, relay/http/fields.py)
except those that would get around a guard of the relay's, which are a 400 naming them.  Values
are the upstream's to judge (it answers a 400 that the relay passes on); only what the relay
itself relies on or guards is checked here: ``model``, ``messages``, ``stream``,
``stream_options``, the output-token ceiling and ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from relay.http.body import BadRequest
from relay.http.fields import FieldPolicy
from relay.http.params import V1_ROLES, RequestBounds, check_limits, check_model

#: The fields this module reads itself; every other one goes through the field policy.
_OWN: Final = frozenset({"messages", "model", "stream", "stream_options"})


@dataclass(frozen=True, slots=True)
class CompletionsRequest:
    model: str
    #: What the relay sends upstream.
    body: dict[str, Any]
    stream: bool
    #: The client asked for the usage chunk (``stream_options.include_usage``).
    client_usage: bool


def completions_request(body: Any, *, default_model: str | None, models: tuple[str, ...],
                        stream_usage: bool, limits: RequestBounds = RequestBounds(),
                        policy: FieldPolicy = FieldPolicy()) -> CompletionsRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'messages' and 'model'")
    for key in body:
        if key not in _OWN:
            policy.check(key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of message objects", "messages")
    check_limits(body, messages, limits)
    for i, msg in enumerate(messages):
        # Message fields are the upstream's to judge: SDKs echo back whole assistant messages
        # (refusal, annotations, audio, ...), and rejecting those would break existing clients.
        if not isinstance(msg, dict) or msg.get("role") not in V1_ROLES:
            raise BadRequest(f"'messages[{i}]' must be an object whose 'role' is one of "
                             f"{', '.join(sorted(V1_ROLES))}", f"messages[{i}]")
    model = check_model(body, default_model, models)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    client_usage = bool(options and options.get("include_usage") is True)
    out = dict(body)
    out["model"] = model
    if stream and stream_usage:
        # The relay's own log line wants token counts; the extra usage chunk is removed again
        # for a client that did not ask for it.
        out["stream_options"] = {**(options or {}), "include_usage": True}
    return CompletionsRequest(model=model, body=out, stream=bool(stream), client_usage=client_usage)
