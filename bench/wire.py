"""What travels: the fake upstream's chunks and the bytes each client must receive, exactly.

One module for both sides, so the fake upstream sends what the load generator expects and the
load generator can check every stream byte for byte: the upstream's own event stream (direct,
nginx and the relay's /v1 pass it through unchanged) and the relay's /chat events.
"""

from __future__ import annotations

import json
from typing import Any

MODEL = "bench"
#: Token-sized words that exercise JSON escaping and multi-byte UTF-8 as real answers do.
WORDS = (" The", " quick", " brown", " fox", " jumps", " über", " \"lazy\"", " dogs.\n", " 数据", " 🙂",
         " and", " then", " some")
RETRY_MS = 2000


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def prompt(key: str, n: int, dt: float, *, silent: bool = False, close: bool = False, sndbuf: int = 0) -> str:
    """The user message that tells the fake upstream what to send (the relay passes messages on);
    ``close``: it closes the connection after the answer (no idle pooled sockets afterwards);
    ``sndbuf``: the answer's socket send buffer in bytes (0: the kernel's, autotuned up to MiBs)."""
    return (f"bench key={key} n={n} dt={dt!r} silent={int(silent)}" + (" close=1" if close else "")
            + (f" sndbuf={sndbuf}" if sndbuf else ""))


def parse_prompt(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split()[1:])


def request_body(key: str, n: int, dt: float, *, openai: bool, silent: bool = False, close: bool = False,
                 sndbuf: int = 0, responses: bool = False) -> bytes:
    """The client's request: /chat takes no ``stream`` field, the OpenAI API needs it; the Responses
    API takes ``input`` instead of ``messages``."""
    text = prompt(key, n, dt, silent=silent, close=close, sndbuf=sndbuf)
    if responses:
        return dumps({"model": MODEL, "input": text, "stream": True}).encode()
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if openai:
        body["stream"] = True
    return dumps(body).encode()


def word(i: int) -> str:
    return WORDS[i % len(WORDS)]


def usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}


class Chunks:
    """One answer's upstream events (``data: ...\\n\\n`` each), the way OpenAI words them."""

    def __init__(self, key: str) -> None:
        self.head = ('{"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,'
                     '"model":"%s","system_fingerprint":"fp_bench","choices":[{"index":0,"delta":' % (key, MODEL))

    def role(self) -> bytes:
        return f'data: {self.head}{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}\n\n'.encode()

    def token(self, i: int) -> bytes:
        return (f'data: {self.head}{{"content":{dumps(word(i))}}},"logprobs":null,'
                f'"finish_reason":null}}]}}\n\n').encode()

    def finish(self) -> bytes:
        return f'data: {self.head}{{}},"logprobs":null,"finish_reason":"stop"}}]}}\n\n'.encode()

    def usage(self, n: int) -> bytes:
        head = self.head.split(',"choices"')[0]
        return f'data: {head},"choices":[],"usage":{dumps(usage(n))}}}\n\n'.encode()


DONE = b"data: [DONE]\n\n"


def openai_body(key: str, n: int) -> bytes:
    """What direct, nginx and the relay's /v1 deliver (the client asks for no usage chunk)."""
    c = Chunks(key)
    return c.role() + b"".join(c.token(i) for i in range(n)) + c.finish() + DONE


class ResponseEvents:
    """One answer as the Responses API streams it: typed events with sequence numbers, no [DONE]."""

    def __init__(self, key: str) -> None:
        self.response = {"id": f"resp_{key}", "object": "response", "created_at": 1700000000, "model": MODEL}

    @staticmethod
    def _event(kind: str, seq: int, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n".encode()

    def created(self) -> bytes:
        return self._event("response.created", 0, response={**self.response, "status": "in_progress", "output": []})

    def token(self, i: int) -> bytes:
        return self._event("response.output_text.delta", i + 1, item_id="msg_bench", output_index=0,
                           content_index=0, delta=word(i))

    def completed(self, n: int) -> bytes:
        u = usage(n)
        return self._event("response.completed", n + 1, response={
            **self.response, "status": "completed", "output": [],
            "usage": {"input_tokens": u["prompt_tokens"], "output_tokens": n, "total_tokens": u["total_tokens"]}})


def responses_body(key: str, n: int) -> bytes:
    """What direct and the relay's /v1/responses deliver."""
    e = ResponseEvents(key)
    return e.created() + b"".join(e.token(i) for i in range(n)) + e.completed(n)


def chat_body(stream_id: str, n: int) -> bytes:
    """What the relay's /chat delivers for the same answer."""
    parts = [f"id: {stream_id}.0\ndata: "
             f"{dumps({'type': 'start', 'id': stream_id, 'model': MODEL, 'demo': False})}\nretry: {RETRY_MS}\n\n"]
    for i in range(n):
        parts.append(f"id: {stream_id}.{i + 1}\ndata: {dumps({'type': 'delta', 'content': word(i)})}\n\n")
    done = {"type": "done", "finish_reason": "stop", "usage": usage(n)}
    parts.append(f"id: {stream_id}.{n + 1}\ndata: {dumps(done)}\n\n")
    return "".join(parts).encode()
