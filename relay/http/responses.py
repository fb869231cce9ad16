"""The Responses API view: ``POST /v1/responses``, OpenAI's newer API, which its SDKs, the Agents
SDK and the Vercel AI SDK's default provider call.

The same core and guarantees as ``/v1/chat/completions`` (relay/http/openai.py): one generation in
the one registry, the status line held until the upstream answers (real status codes, SDK
exceptions and retries), keepalives, the upstream closed the moment the client leaves, one honest
ending, limits, failover before the first event, drain.  The upstream's typed events go out
byte-identical (relay/http/responses_wire.py).  Not yet: background answers kept and resumed by
the relay, and routing ``previous_response_id`` to the upstream that produced it when several
upstreams serve a model (with one upstream, as is usual, a conversation simply continues there).
"""

from __future__ import annotations

from aiohttp import web

from relay.http.admission import Refused, refusal, start_generation
from relay.http.appkeys import CATALOG, CONFIG, UPSTREAMS
from relay.http.body import BadRequest, read_json
from relay.http.errors import error_response, request_refusal
from relay.http.openai import complete_answer, stream_answer
from relay.http.params import RequestBounds
from relay.http.responses_body import responses_request
from relay.core.generation import Ending, Generation
from relay.http.responses_wire import ResponsesWire, error_event

LAGGED = Ending("client_too_slow", "the client read the stream too slowly and fell behind what the relay keeps")


def _lagged(gen: Generation) -> bytes:
    wire = gen.wire
    return error_event(LAGGED, wire.last_sequence + 1 if isinstance(wire, ResponsesWire) else 0)


async def create_response(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    catalog = request.app[CATALOG]
    try:
        req = responses_request(await read_json(request), default_model=catalog.default_model,
                                models=catalog.allowed, limits=RequestBounds.of(config))
        why = request.app[UPSTREAMS].no_api(req.model, "responses")
        if why is not None:
            raise BadRequest(why, "model")
        gen = await start_generation(request, kind="responses", model=req.model, body=req.body,
                                     wire=ResponsesWire(), resumable=False, streaming=req.stream)
    except BadRequest as exc:
        return error_response(exc.status, exc.message, param=exc.param, refusal=request_refusal(exc.status))
    except Refused as exc:
        return refusal(exc)
    stream = req.stream
    del req  # its body: not held by this frame for the whole answer
    sub = gen.attach(0)  # attached before anything can wait: a client that leaves cancels at once
    if stream:
        return await stream_answer(request, config, gen, sub, lagged=_lagged)
    return await complete_answer(gen, sub)
