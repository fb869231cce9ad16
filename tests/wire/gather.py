"""Rebuild the recorded part of the wire corpus (tests/wire/recorded/) from its public sources.

Run by hand, not by the tests:  python tests/wire/gather.py PYDANTIC_AI_CHECKOUT VERCEL_AI_CHECKOUT
(git checkouts at the commits below; needs PyYAML).  Each recording names its source file at
its commit, and how exact it is:

* ``bytes``: the response body as the provider sent it (pydantic-ai's VCR cassettes keep a
  streamed body as its text, ``body.string``).
* ``payloads``: every event's data as the provider sent it, framed again as ``data: …`` and a
  blank line with the closing ``data: [DONE]`` (the Vercel AI SDK's ``*.chunks.txt`` fixtures
  keep one event's data per line), or an error body's JSON as parsed (a cassette's
  ``parsed_body``: the same JSON value, not necessarily the same bytes).

The hand-made cases (tests/wire/reconstructed/) are not written by this script.  The Responses
API's recordings go to tests/wire/responses/recorded/ (the Vercel AI SDK's ``payloads`` framed
with ``event:`` lines, as OpenAI frames them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PYDANTIC_AI = ("pydantic/pydantic-ai", "4fda38988f2939fa6ea9cdefcf120693e10ef491")
VERCEL_AI = ("vercel/ai", "ed857f50f112e23930b0c2dd8d532cc8bebbc911")
#: A recording larger than this is left out: the corpus is replayed byte by byte.
MAX_BODY = 48 * 1024
#: Response headers kept: the ones a client (or the relay) reads.
KEPT_HEADERS = ("content-type", "retry-after", "retry-after-ms", "x-request-id")

CASSETTES = {  # provider -> cassettes under tests/models/cassettes/
    "crusoe": ["test_crusoe/test_crusoe_model_streaming"],
    "groq": ["test_groq/test_groq_model_web_search_tool_stream", "test_groq/test_tool_regular_error",
             "test_groq/test_tool_use_failed_error", "test_groq/test_tool_use_failed_error_streaming",
             "test_groq/test_tool_use_failed_error_streaming_with_text",
             "test_groq/test_tool_use_failed_error_with_text"],
    "mistral": ["test_mistral/test_mistral_model_thinking_part_iter"],
    "openai": ["test_openai/test_openai_moderation_stream", "test_openai/test_openai_o1_mini_system_role[developer]",
               "test_openai/test_openai_web_search_tool_model_not_supported",
               "test_openai/test_run_stream_sync_streams_real_model"],
    "openrouter": ["test_openrouter/test_openrouter_errors_raised", "test_openrouter/test_openrouter_stream_error",
                   "test_openrouter/test_openrouter_stream_with_native_options",
                   "test_openrouter/test_openrouter_stream_with_reasoning",
                   "test_openrouter/test_openrouter_streaming_reasoning",
                   "test_openrouter/test_openrouter_web_search_annotations_stream"],
    "snowflake": ["test_snowflake/test_snowflake_model_streaming", "test_snowflake/test_snowflake_thinking_streaming"],
    "zai": ["test_zai/test_zai_thinking_stream"],
    "deepseek": ["test_deepseek/test_deepseek_model_thinking_stream"],
    "huggingface": ["test_huggingface/test_hf_model_thinking_part_iter"],
}

CHUNKS = {  # provider -> fixtures in the Vercel AI SDK
    "alibaba": ["packages/alibaba/src/__fixtures__/alibaba-reasoning.chunks.txt",
                "packages/alibaba/src/__fixtures__/alibaba-text.chunks.txt",
                "packages/alibaba/src/__fixtures__/alibaba-tool-call.chunks.txt"],
    "azure": ["packages/openai/src/chat/__fixtures__/azure-model-router.1.chunks.txt",
              "packages/azure/src/__fixtures__/azure-deepseek-reasoning.1.chunks.txt"],
    "openai": ["packages/openai/src/chat/__fixtures__/openai-text.chunks.txt"],
    "deepseek": ["packages/deepseek/src/chat/__fixtures__/deepseek-reasoning.chunks.txt",
                 "packages/deepseek/src/chat/__fixtures__/deepseek-text.chunks.txt",
                 "packages/deepseek/src/chat/__fixtures__/deepseek-tool-call.chunks.txt"],
    "groq": ["packages/groq/src/__fixtures__/groq-reasoning.chunks.txt",
             "packages/groq/src/__fixtures__/groq-text.chunks.txt",
             "packages/groq/src/__fixtures__/groq-tool-call.chunks.txt"],
    "mistral": ["packages/mistral/src/__fixtures__/mistral-incremental-tool-call.chunks.txt",
                "packages/mistral/src/__fixtures__/mistral-reasoning.chunks.txt",
                "packages/mistral/src/__fixtures__/mistral-text.chunks.txt",
                "packages/mistral/src/__fixtures__/mistral-tool-call.chunks.txt"],
    "moonshotai": ["packages/moonshotai/src/__fixtures__/moonshotai-stream.chunks.txt"],
    "perplexity": ["packages/perplexity/src/__fixtures__/perplexity-citations.chunks.txt",
                   "packages/perplexity/src/__fixtures__/perplexity-text.chunks.txt"],
    "xai": ["packages/xai/src/__fixtures__/xai-text.chunks.txt", "packages/xai/src/__fixtures__/xai-tool-call.chunks.txt"],
}


def show(checkout: Path, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(checkout), "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def headers_of(raw: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, values in (raw or {}).items():
        if name.lower() in KEPT_HEADERS and values:
            out[name.lower()] = str(values[0] if isinstance(values, list) else values)
    return out


def from_cassettes(checkout: Path, out: Path) -> int:
    repo, commit = PYDANTIC_AI
    written = 0
    for provider, names in CASSETTES.items():
        for name in names:
            path = f"tests/models/cassettes/{name}.yaml"
            doc = yaml.safe_load(show(checkout, commit, path))
            picked = 0
            seen: set[str] = set()
            for i, interaction in enumerate(doc["interactions"]):
                if not interaction["request"]["uri"].endswith("/chat/completions"):
                    continue
                resp = interaction["response"]
                headers = headers_of(resp.get("headers", {}))
                status = resp["status"]["code"]
                streamed = headers.get("content-type", "").startswith("text/event-stream")
                if not streamed and status < 400:
                    continue
                if "body" in resp and "string" in resp["body"]:
                    body, fidelity = resp["body"]["string"], "bytes"
                elif "parsed_body" in resp:
                    body, fidelity = json.dumps(resp["parsed_body"], ensure_ascii=False), "payloads"
                else:
                    continue
                if len(body.encode()) > MAX_BODY or body in seen:  # a retried request, answered alike
                    continue
                seen.add(body)
                picked += 1
                stem = name.split("/", 1)[1].replace("[", "-").replace("]", "")
                write(out / provider / f"{stem}.{picked}.json", {
                    "provider": provider,
                    "source": f"https://github.com/{repo}/blob/{commit}/{path}",
                    "interaction": i,
                    "fidelity": fidelity,
                    "status": status,
                    "headers": headers,
                    "body": body,
                })
                written += 1
                if picked == 2:
                    break
    return written


def chat_body(lines: list[str]) -> str | None:
    """Chat completions: ``data: <json>`` and a blank line each, and the closing ``[DONE]``."""
    return "".join(f"data: {line}\n\n" for line in lines) + "data: [DONE]\n\n"


def from_chunks(checkout: Path, out: Path, table: dict[str, list[str]] | None = None,
                frame: Callable[[list[str]], str | None] = chat_body) -> int:
    """The Vercel AI SDK's fixtures in ``table``, each line one event's data, framed by ``frame``
    (None: left out, named on the output)."""
    repo, commit = VERCEL_AI
    written = 0
    for provider, paths in (CHUNKS if table is None else table).items():
        for path in paths:
            lines = [line for line in show(checkout, commit, path).splitlines() if line.strip()]
            body = frame(lines)
            if body is None:
                print(f"left out {path}: not the events of one answer")
                continue
            if len(body.encode()) > MAX_BODY:
                continue
            write(out / provider / (Path(path).name.removesuffix(".chunks.txt") + ".json"), {
                "provider": provider,
                "source": f"https://github.com/{repo}/blob/{commit}/{path}",
                "fidelity": "payloads",
                "status": 200,
                "headers": {"content-type": "text/event-stream"},
                "body": body,
            })
            written += 1
    return written


# The Responses API (tests/wire/responses/recorded/, replayed by tests/test_wire_responses.py).
RESPONSES_CASSETTES = {  # provider -> pydantic-ai cassettes whose /v1/responses answers are streamed
    "openai": ["test_openai_responses/test_openai_responses_stream",
               "test_openai_responses/test_openai_responses_streaming_usage",
               "test_openai_responses/test_openai_responses_model_web_search_tool_stream",
               "test_openai_responses/test_openai_responses_phase_streamed_on_part_start",
               "test_openai_responses/test_openai_responses_moderation_stream",
               "test_openai_responses/test_background_mode_streaming_vcr",
               "test_openai/test_openai_instructions_with_responses_logprobs_streaming"],
    "deepseek": ["test_deepseek_responses/test_deepseek_responses[text_stream]",
                 "test_deepseek_responses/test_deepseek_responses[function_tool_stream]"],
    "openrouter": ["test_openai_responses/test_openai_responses_raw_cot_stream_openrouter"],
}
RESPONSES_CHUNKS = {  # provider -> the Vercel AI SDK's Responses fixtures (one event's data per line)
    "openai": [f"packages/openai/src/responses/__fixtures__/{name}.chunks.txt" for name in (
        "openai-error.1", "openai-custom-tool.1", "openai-phase.1", "openai-reasoning-encrypted-content.1",
        "openai-web-search-tool.1", "openai-code-interpreter-tool.1", "openai-file-search-tool.1",
        "openai-mcp-tool.1", "openai-local-shell-tool.1", "openai-apply-patch-tool.1", "openai-tool-search.1",
        "parallel-tool-call-wrapper.1")],
    "github-copilot": ["packages/openai/src/responses/__fixtures__/github-copilot-id-rotation.1.chunks.txt"],
}


def responses_from_cassettes(checkout: Path, out: Path) -> int:
    repo, commit = PYDANTIC_AI
    written = 0
    for provider, names in RESPONSES_CASSETTES.items():
        for name in names:
            path = f"tests/models/cassettes/{name}.yaml"
            doc = yaml.safe_load(show(checkout, commit, path))
            for i, interaction in enumerate(doc["interactions"]):
                if not interaction["request"]["uri"].split("?")[0].endswith("/responses"):
                    continue
                resp = interaction["response"]
                headers = headers_of(resp.get("headers", {}))
                body = resp.get("body", {}).get("string")
                if not headers.get("content-type", "").startswith("text/event-stream") or not body:
                    continue
                if len(body.encode()) > MAX_BODY:
                    continue
                stem = name.split("/", 1)[1].replace("[", "-").replace("]", "")
                write(out / provider / f"{stem}.json", {
                    "provider": provider, "source": f"https://github.com/{repo}/blob/{commit}/{path}",
                    "interaction": i, "fidelity": "bytes", "status": resp["status"]["code"], "headers": headers,
                    "body": body})
                written += 1
                break
    return written


def responses_body(lines: list[str]) -> str | None:
    """The Responses API, framed as OpenAI frames it: ``event: <type>`` and ``data: <json>``, a
    blank line after; None for a fixture that is not one answer's events."""
    try:
        body = "".join(f"event: {json.loads(line)['type']}\ndata: {line}\n\n" for line in lines)
    except ValueError:
        return None  # (a line that is not one JSON value)
    if body.count("event: response.created") != 1:
        return None  # (several answers of a multi-step test)
    return body


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: gather.py PYDANTIC_AI_CHECKOUT VERCEL_AI_CHECKOUT")
    out = Path(__file__).parent / "recorded"
    count = from_cassettes(Path(sys.argv[1]), out) + from_chunks(Path(sys.argv[2]), out)
    print(f"{count} recordings written under {out}")
    out = Path(__file__).parent / "responses" / "recorded"
    count = responses_from_cassettes(Path(sys.argv[1]), out) + from_chunks(Path(sys.argv[2]), out, RESPONSES_CHUNKS, responses_body)
    print(f"{count} Responses API recordings written under {out}")


if __name__ == "__main__":
    main()
