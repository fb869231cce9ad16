"""The generation fields a request may carry: one table for both views, and /v1's vendor-field rule.

``PARAMETERS`` is OpenAI's chat-completions parameters (openai-python's CompletionCreateParams)
besides ``messages``, ``model``, ``stream`` and ``stream_options``.  ``/chat`` carries those marked
for it, checked by the table's rule (its clients are pages and scripts written against the
relay, so a wrong type is a 400 naming the field); ``/v1`` passes every value on for the upstream
to judge, as the SDKs expect.

Any other top-level field on ``/v1`` is a vendor's (``top_k``, OpenRouter's ``provider``, vLLM's
``chat_template_kwargs``...) and is forwarded, so SDK code that works against a provider keeps
working behind the relay.  The exceptions are the fields that would get around one of the
relay's guards on spending while that guard is set (``GUARDED``), the operator's own
``--refuse-field`` list, and everything under ``--strict-fields``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from relay.http.body import BadRequest
from relay.http.params import is_int, is_number

Check = Callable[[str, Any], None]


def _number(low: float, high: float) -> Check:
    def check(name: str, value: Any) -> None:
        if not is_number(value) or not low <= value <= high:
            raise BadRequest(f"'{name}' must be a number from {low:g} to {high:g}", name)
    return check


def _positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer", name)


def _int(name: str, value: Any) -> None:
    if not is_int(value):
        raise BadRequest(f"'{name}' must be an integer", name)


def _top_logprobs(name: str, value: Any) -> None:
    if not is_int(value) or not 0 <= value <= 20:
        raise BadRequest(f"'{name}' must be an integer from 0 to 20", name)


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false", name)


def _str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string", name)


def _object(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be an object", name)


def _str_or_object(name: str, value: Any) -> None:
    if not isinstance(value, (str, dict)):
        raise BadRequest(f"'{name}' must be a string or an object", name)


def _objects(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BadRequest(f"'{name}' must be a list of objects", name)


def _stop(name: str, value: Any) -> None:
    if not (isinstance(value, str) or (isinstance(value, list) and len(value) <= 4
                                       and all(isinstance(s, str) for s in value))):
        raise BadRequest(f"'{name}' must be a string or a list of up to 4 strings", name)


@dataclass(frozen=True, slots=True)
class Param:
    #: The check ``/chat`` applies; None: not carried on ``/chat``.
    chat: Check | None = None


PARAMETERS: Final[dict[str, Param]] = {
    "temperature": Param(_number(0, 2)),
    "top_p": Param(_number(0, 1)),
    "max_tokens": Param(_positive_int),
    "max_completion_tokens": Param(_positive_int),
    "stop": Param(_stop),
    "seed": Param(_int),
    "tools": Param(_objects),
    "tool_choice": Param(_str_or_object),
    "parallel_tool_calls": Param(_bool),
    "reasoning_effort": Param(_str),
    "response_format": Param(_object),
    "logprobs": Param(_bool),
    "top_logprobs": Param(_top_logprobs),
    "presence_penalty": Param(_number(-2, 2)),
    "frequency_penalty": Param(_number(-2, 2)),
    "logit_bias": Param(_object),
    "user": Param(_str),
    "safety_identifier": Param(_str),
    "prompt_cache_key": Param(_str),
    "service_tier": Param(_str),
    "verbosity": Param(_str),
    "metadata": Param(_object),
    "store": Param(_bool),
    # /v1 only.  ``n``: /chat shows one choice, and every choice is billed.
    "n": Param(),
    "audio": Param(), "modalities": Param(), "prediction": Param(), "web_search_options": Param(),
    "function_call": Param(), "functions": Param(), "moderation": Param(),
    "prompt_cache_options": Param(), "prompt_cache_retention": Param(),
}

#: Why a field is not carried on /chat, where the reason is more than "unknown".
CHAT_REFUSED: Final = {
    "n": "'n' is not supported on /chat: it shows one choice, and every choice is billed (use /v1/chat/completions)",
}


@dataclass(frozen=True, slots=True)
class Guard:
    what: str
    fields: tuple[str, ...]


#: Vendor fields that would get around a guard of the relay's while that guard is set.  Not
#: exhaustive (no list of every vendor's fields can be): ``--refuse-field`` adds to it, and
#: ``--strict-fields`` forwards only ``PARAMETERS``.
GUARDED: Final = {
    # OpenRouter's fallback ``models`` and ``route``, LiteLLM's ``fallbacks``: another model.
    "models": Guard("the model allowlist (--allow-model)", ("models", "route", "fallbacks")),
    # vLLM's and TGI's ``best_of``, vLLM's ``use_beam_search``, HF's ``num_return_sequences``:
    # more sequences generated (and billed) than ``n`` says.
    "max_n": Guard("the ceiling on choices (--max-n)", ("best_of", "use_beam_search", "num_return_sequences")),
    # Output-token counts under other names (TGI, llama.cpp, Ollama, vLLM's floor) and thinking
    # budgets (Anthropic's ``thinking``, OpenRouter's ``reasoning``, Gemini's ``extra_body``).
    "max_output_tokens": Guard("the output-token ceiling (--max-output-tokens)", (
        "max_new_tokens", "n_predict", "num_predict", "max_output_tokens", "min_tokens",
        "thinking", "thinking_budget", "thinking_config", "reasoning", "extra_body")),
}


@dataclass(frozen=True, slots=True)
class FieldPolicy:
    """What /v1 does with a field outside ``PARAMETERS``."""

    strict: bool = False
    refused: frozenset[str] = frozenset()
    #: Which guards are set: keys of ``GUARDED``.
    guards: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, strict: bool, refused: Iterable[str], allowlist: bool, max_n: bool,
           max_output_tokens: bool) -> FieldPolicy:
        guards = {name for name, on in (("models", allowlist), ("max_n", max_n),
                                        ("max_output_tokens", max_output_tokens)) if on}
        return cls(strict=strict, refused=frozenset(refused), guards=frozenset(guards))

    def check(self, name: str) -> None:
        """Raise BadRequest naming ``name`` when /v1 must not forward it."""
        if name in PARAMETERS:
            return
        if self.strict:
            raise BadRequest(f"Unrecognized request argument supplied: {name} (this relay forwards only the "
                             "documented chat-completions parameters: --strict-fields)", name)
        if name in self.refused:
            raise BadRequest(f"'{name}' is refused by this relay's configuration (--refuse-field)", name)
        for guard in self.guards:
            if name in GUARDED[guard].fields:
                raise BadRequest(f"'{name}' is refused by this relay: it would get around {GUARDED[guard].what}",
                                 name)


def check_chat_field(name: str, value: Any) -> None:
    """A /chat generation field: known to the table, carried on /chat, of the right type."""
    param = PARAMETERS.get(name)
    if param is None or param.chat is None:
        raise BadRequest(CHAT_REFUSED.get(name) or f"'{name}' is not a supported field; supported: "
                         f"{', '.join(sorted(CHAT_FIELDS))}", name)
    param.chat(name, value)


#: Every top-level field of a /chat body.
CHAT_FIELDS: Final = frozenset({"messages", "prompt", "model"} | {k for k, p in PARAMETERS.items() if p.chat})
