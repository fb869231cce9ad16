"""The model API client: one chat completion at a time, over its own connection (relay/upstream/http1.py).

It builds the request (URL, key header, extra headers and query from configuration only:
nothing a client sends can change where the relay connects), maps HTTP failures to one
``UpstreamError``, decodes the event stream incrementally and enforces the timeouts.

Decisions (docs/architecture.md): the body is pushed, not read: each piece the connection
receives is decoded here and its chunks handed to the generation in the same callback, with no
buffer and no task switch between.  Decoding is incremental because pieces split anywhere.  EOF
after a ``finish_reason`` counts as finished (some servers omit ``[DONE]``), EOF before one is
``upstream_ended``; the connection is closed, never drained, because closing it is the only way
to stop the billing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from relay import __version__
from relay.config import Config
from relay.jsoncodec import dumps
from relay.sse import Event, EventTooLarge, SSEDecoder
from relay.upstream.errors import UpstreamError, error_from_body, error_from_response, read_bounded
from relay.upstream.http1 import Answer, ConnectFailed, Connector, Head, request_head
from relay.upstream.metadata import Redactor, request_id_of


@dataclass(frozen=True, slots=True)
class Chunk:
    """One upstream event: the data exactly as sent, its parsed JSON, and whether it carries a delta
    (content, reasoning or a tool call in any choice): the one rule every view counts deltas by."""

    data: str
    obj: dict[str, Any]
    delta: bool


@dataclass(frozen=True, slots=True)
class Completion:
    """A non-streamed answer: the body exactly as sent, its parsed JSON and the upstream's request id."""

    raw: bytes
    obj: dict[str, Any]
    request_id: str | None
    status: int = 200


@dataclass(frozen=True, slots=True)
class Target:
    """Where one upstream is and how to talk to it: from configuration only, never from a client."""

    name: str
    base_url: str
    api_key: str | None
    api_key_header: str
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]
    connect_timeout: float
    first_token_timeout: float
    idle_timeout: float


log = logging.getLogger("relay.upstream")


class UpstreamResponse:
    """One streamed answer.  ``run(on_chunks)`` hands each batch of chunks to ``on_chunks`` as it
    arrives, from the connection's own callback (relay/upstream/http1.py), and returns at the end
    of the answer or raises its UpstreamError."""

    def __init__(self, answer: Answer, head: Head, config: Config, target: Target, attempt_started: float,
                 total_deadline: float, redact: Redactor) -> None:
        self._answer = answer
        self._redact = redact
        self._decoder = SSEDecoder(max_event_size=config.max_upstream_event, error_field=True)
        self._idle = target.idle_timeout
        self._first_token_timeout = target.first_token_timeout
        self._first_deadline = attempt_started + target.first_token_timeout
        self._total_timeout = config.total_timeout
        self._total_deadline = total_deadline
        #: When the last delta (content, reasoning, a tool call, the finish) arrived; None: none yet.
        #: The idle timeout counts from here, not from the last byte: comments and a trickle of
        #: bytes that never make an event do not keep a stream alive.
        self._last_delta: float | None = None
        self._ended = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        #: Reading (not paused for backpressure): only then do the deadlines run.
        self._reading = False
        self._paused_at = 0.0
        self._on_chunks: Callable[[list[Chunk]], None] | None = None
        self._done: asyncio.Future[None] | None = None
        self.status = head.status
        self.headers = head.headers
        self.request_id = request_id_of(head.headers, redact)
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    async def run(self, on_chunks: Callable[[list[Chunk]], None]) -> None:
        """Deliver the answer's chunks to ``on_chunks`` until its end; UpstreamError for a failure.

        ``on_chunks`` runs inside the connection's callback: what it raises ends the answer with
        that exception, raised here.
        """
        if self._ended:
            return
        done = self._done = self._loop.create_future()
        self._on_chunks = on_chunks
        self._reading = True
        self._arm(self._deadline())
        self._answer.deliver(self)
        try:
            await done
        finally:
            self._reading = False
            self._on_chunks = None
            self._done = None

    # -- the connection's side (http1.BodySink) --------------------------------------------

    def body(self, data: bytes) -> None:
        done = self._done
        if done is None or done.done():
            return
        try:
            events = self._decoder.feed(data)
        except EventTooLarge as exc:
            self._fail(UpstreamError("upstream_error", f"the upstream sent an oversized event: {exc}",
                                     retriable=False, request_id=self.request_id))
            return
        chunks: list[Chunk] = []
        failure: BaseException | None = None
        try:
            self._parse(events, chunks)
        except UpstreamError as exc:
            failure = exc  # after the chunks before it in the same read, which are delivered
        try:
            if chunks:
                assert self._on_chunks is not None
                self._on_chunks(chunks)
        except Exception as exc:  # the generation's own failure, raised in its task
            failure = exc
        if done.done():
            return  # cancelled from within on_chunks (its last client found gone)
        if failure is not None:
            self._fail(failure)
        elif self._ended:
            self._stop()
            done.set_result(None)
        elif self._reading:
            timer = self._timer
            deadline = self._deadline()
            if timer is None or timer.when() > deadline:
                self._arm(deadline)

    def end(self, exc: Exception | None) -> None:
        done = self._done
        if done is None or done.done():
            return
        self._ended = True
        if exc is not None:
            failure = UpstreamError("upstream_ended", "the upstream connection broke before the answer was finished",
                                    retriable=True, request_id=self.request_id, failover=True)
            failure.__cause__ = exc
            self._fail(failure)
        elif self.finish_reason is None:
            self._fail(UpstreamError("upstream_ended", "the upstream ended the stream before the answer was finished",
                                     retriable=True, request_id=self.request_id, failover=True))
        else:
            self._stop()
            done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._ended = True
        self._stop()
        done = self._done
        if done is not None and not done.done():
            done.set_exception(exc)

    # -- backpressure ----------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading (every reader is full): TCP holds the upstream back, and its clocks stop."""
        if not self._reading or self._ended:
            return
        self._reading = False
        self._paused_at = self._loop.time()
        self._answer.pause()

    def resume(self) -> None:
        if self._reading or self._ended or self._done is None:
            return
        # The pause was the relay's silence, not the upstream's: the idle and first-token
        # deadlines move by it (the total deadline does not).
        paused = self._loop.time() - self._paused_at
        if self._last_delta is not None:
            self._last_delta += paused
        self._first_deadline += paused
        self._reading = True
        self._arm(self._deadline())
        self._answer.resume()

    # One timer per stream instead of an asyncio.timeout per read: every delta moves the idle
    # deadline, so the timer is only re-armed (at the latest deadline) when it fires early.

    def _deadline(self) -> float:
        if self._last_delta is not None:
            return min(self._last_delta + self._idle, self._total_deadline)
        return min(self._first_deadline, self._total_deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading or self._ended:
            return
        now = self._loop.time()
        deadline = self._deadline()
        if now >= deadline:
            self._fail(self._timeout_error(now))
        else:
            self._arm(deadline)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _parse(self, events: list[Event], chunks: list[Chunk]) -> None:
        for event in events:
            data = event.data
            if event.error is not None or event.event == "error":
                raise self._event_error(event)
            if data == "[DONE]":
                self._ended = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                raise UpstreamError("upstream_error", "the upstream sent an event whose data is not JSON",
                                    retriable=True, request_id=self.request_id, failover=True) from None
            if not isinstance(obj, dict):
                raise UpstreamError("upstream_error", "the upstream sent an event that is not a JSON object",
                                    retriable=True, request_id=self.request_id, failover=True)
            if obj.get("error") or obj.get("object") == "error":
                # ``{"object": "error", ...}``: vLLM's ErrorResponse before it nested the error.
                raise error_from_body(obj, status=None, request_id=self.request_id, midstream=True,
                                      redact=self._redact, raw=data)
            delta = False
            for choice in obj.get("choices") or ():
                if isinstance(choice, dict):
                    if choice.get("finish_reason"):
                        self.finish_reason = str(choice["finish_reason"])
                    if not delta:
                        d = choice.get("delta")
                        delta = isinstance(d, dict) and bool(
                            d.get("content") or d.get("tool_calls") or d.get("reasoning_content")
                            or d.get("reasoning"))
            if obj.get("usage"):
                self.usage = obj["usage"]
            if delta or self.finish_reason is not None:
                self._last_delta = self._loop.time()
            chunks.append(Chunk(data, obj, delta))

    def _event_error(self, event: Event) -> UpstreamError:
        """An error that is not a ``data:`` chunk: llama.cpp's ``error:`` field line (its value is
        the error object itself), or an ``event: error`` whose data may lack the ``error`` key or
        not be JSON.  Either becomes ``{"error": ...}``, the form every OpenAI client reads."""
        text = event.error if event.error is not None else event.data
        try:
            obj: Any = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("error"):
            return error_from_body(obj, status=None, request_id=self.request_id, midstream=True,
                                   redact=self._redact, raw=text)
        if isinstance(obj, dict):
            raw = '{"error":' + text.strip() + "}"  # the upstream's own object, byte for byte inside
        else:
            obj = {"message": text.strip() or "the upstream sent an error event"}
            raw = None
        return error_from_body({"error": obj}, status=None, request_id=self.request_id, midstream=True,
                               redact=self._redact, raw=raw)

    def _timeout_error(self, now: float) -> UpstreamError:
        failover = False
        if now >= self._total_deadline:
            phase, msg = "total", f"the answer did not finish within the total timeout ({self._total_timeout:g} s)"
        elif self._last_delta is None:
            phase = "first_token"
            msg = f"the upstream sent no answer within the first-token timeout ({self._first_token_timeout:g} s)"
            failover = True
        else:
            phase, msg = "idle", f"the upstream went silent for longer than the idle timeout ({self._idle:g} s)"
        return UpstreamError("upstream_timeout", msg, retriable=True, request_id=self.request_id, failover=failover,
                             timeout=phase)

    def close(self) -> None:
        """Close the connection (never drained: that would let the upstream keep generating)."""
        self._stop()
        self._ended = True
        self._answer.close()

    def shutdown(self) -> None:
        """Tell the upstream now, before ``close()``: ``transport.close()`` leaves the socket open
        until the loop's next iteration, which is many milliseconds away when hundreds of clients
        left at once, and the upstream generates (and bills) until its connection closes."""
        transport = self._answer.transport
        if transport is not None:
            shutdown_now(transport)


def shutdown_now(transport: asyncio.BaseTransport) -> None:
    """Send the peer our FIN at once (``shutdown``), whatever the transport does with the socket later.

    The transport's own socket object may refuse ``shutdown`` (uvloop's does), so a second Python
    socket object is made on the same descriptor and detached again, never closed.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        fd = sock.fileno()
        if fd < 0:
            return
        raw = socket.socket(sock.family, sock.type, 0, fd)
    except (OSError, ValueError, AttributeError):
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    finally:
        raw.detach()


class UpstreamClient:
    """One upstream: builds its requests from configuration and opens streamed answers."""

    def __init__(self, session: aiohttp.ClientSession, config: Config, target: Target, redact: Redactor,
                 connector: Connector | None = None) -> None:
        #: For ``/models`` only; answers go through ``connector`` (relay/upstream/http1.py).
        self._session = session
        self._connector = connector or Connector(config.pool_limit)
        self._config = config
        self.target = target
        self.name = target.name
        self.base_url = target.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self._params = list(target.query)
        self._answer_url = URL(self.url).extend_query(self._params)
        # The codings http1.py decodes, named: with no Accept-Encoding any coding would be acceptable.
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json",
                   "Accept-Encoding": "gzip, deflate", "User-Agent": f"relay/{__version__}"}
        configured = {name.lower() for name, _ in target.headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in configured}  # theirs win, in any case
        headers.update(dict(target.headers))
        if target.api_key:
            if target.api_key_header.lower() == "authorization":
                headers["Authorization"] = f"Bearer {target.api_key}"
            else:
                headers[target.api_key_header] = target.api_key
        for name, value in headers.items():
            if any(c in value for c in "\r\n\0"):
                # Never in the message: the value may be the key.
                raise ValueError(f"the upstream header {name!r} contains a line break or NUL")
        self._headers = headers
        self._redact = redact

    async def open(self, body: dict[str, Any], *, total_deadline: float | None = None) -> UpstreamResponse:
        """POST the request; raise UpstreamError unless the upstream answers 2xx with an event stream.

        ``total_deadline`` (loop time) is the request's, across all its attempts; the first-token
        timeout counts from this attempt.
        """
        started = asyncio.get_running_loop().time()
        if total_deadline is None:
            total_deadline = started + self._config.total_timeout
        first = started + self.target.first_token_timeout
        if first <= total_deadline:
            limit, deadline, phase = self.target.first_token_timeout, first, "first_token"
            too_late = f"the upstream sent no answer within the first-token timeout ({limit:g} s)"
        else:
            deadline, phase = total_deadline, "total"
            too_late = f"the answer did not finish within the total timeout ({self._config.total_timeout:g} s)"
        answer, head = await self._post(body, "text/event-stream", deadline, too_late, phase,
                                        failover=first <= total_deadline)
        ctype = head.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            answer.close()
            raise UpstreamError("upstream_error",
                                f"the upstream answered {head.status} with {ctype or 'no content type'}, "
                                "not an event stream", status=head.status, retriable=False,
                                request_id=request_id_of(head.headers, self._redact), failover=True)
        return UpstreamResponse(answer, head, self._config, self.target, started, total_deadline, self._redact)

    async def complete(self, body: dict[str, Any], *, total_deadline: float | None = None) -> Completion:
        """A non-streamed answer: the upstream's JSON body as sent (bounded), within the total timeout."""
        deadline = total_deadline or asyncio.get_running_loop().time() + self._config.total_timeout
        too_late = f"the answer did not finish within the total timeout ({self._config.total_timeout:g} s)"
        answer, head = await self._post(body, "application/json", deadline, too_late, "total", failover=False)
        request_id = request_id_of(head.headers, self._redact)
        try:
            async with asyncio.timeout_at(deadline):
                raw = await answer.read(self._config.max_upstream_event + 1)
        except TimeoutError:
            raise UpstreamError("upstream_timeout", too_late, retriable=True, request_id=request_id,
                                timeout="total") from None
        except ConnectionError as exc:
            raise UpstreamError("upstream_ended", "the upstream connection broke before the answer was finished",
                                retriable=True, request_id=request_id, failover=True) from exc
        finally:
            answer.close()
        if len(raw) > self._config.max_upstream_event:
            raise UpstreamError("upstream_error", "the upstream's answer is larger than --max-upstream-event",
                                request_id=request_id)
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamError("upstream_error", "the upstream's answer is not a JSON object",
                                retriable=True, request_id=request_id, failover=True)
        if obj.get("error"):
            raise error_from_body(obj, status=None, request_id=request_id, midstream=False,
                                  redact=self._redact, raw=raw.decode("utf-8", "replace"))
        return Completion(raw, obj, request_id, head.status)

    async def _post(self, body: dict[str, Any], accept: str, deadline: float, too_late: str, phase: str, *,
                    failover: bool) -> tuple[Answer, Head]:
        """POST ``body``; the answer once its headers are in, or UpstreamError for any failure or non-2xx.

        Redirects are not followed: one would carry the key (a custom header such as Azure's
        ``api-key`` survives a redirect to another host) wherever the upstream points.
        """
        payload = dumps(body).encode()
        request = request_head("POST", self._answer_url, {**self._headers, "Accept": accept}, len(payload))
        answer: Answer | None = None
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self._connector.send(self._answer_url, request, payload, self.target.connect_timeout)
                head = await answer.head
        except ConnectFailed as exc:
            if exc.timeout:
                raise UpstreamError("upstream_timeout", exc.reason, retriable=True, failover=True,
                                    timeout="connect") from None
            # Debug: the pool warns once when an upstream starts failing (relay/upstream/pool.py).
            log.debug("cannot connect to the upstream %s: %s", self.name, exc.reason)
            raise UpstreamError("upstream_error", exc.reason, status=None, retriable=True, failover=True) from None
        except TimeoutError:
            if answer is not None:
                answer.close()
            raise UpstreamError("upstream_timeout", too_late, retriable=True, failover=failover,
                                timeout=phase) from None
        except ConnectionError as exc:
            if answer is not None:
                answer.close()
            raise UpstreamError("upstream_error", f"the upstream request failed ({exc})",
                                status=None, retriable=True, failover=True) from None
        except BaseException:
            if answer is not None:
                answer.close()
            raise
        if head.status >= 300:
            # The error body is read under a deadline too: an upstream that sends its status and
            # then nothing must not hold the stream past the timeouts.  Headers are the upstream's
            # first sign of life, so from here silence is bounded by the idle timeout.
            body_deadline = min(deadline, asyncio.get_running_loop().time() + self.target.idle_timeout)
            try:
                raise await error_from_response(head.status, head.reason, head.headers, answer.read,
                                                redact=self._redact, deadline=body_deadline)
            finally:
                answer.close()
        return answer, head

    async def probe(self, timeout: float) -> int:
        """``GET {base}/models`` with the key; the status, for the readiness answer (the body is not read)."""
        async with self._session.get(self.base_url + "/models", headers=self._probe_headers(), params=self._params,
                                     timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as resp:
            return resp.status

    async def model_ids(self, timeout: float) -> list[str]:
        """The ids in the upstream's own ``GET {base}/models`` (for an upstream that serves ``"*"``)."""
        async with self._session.get(self.base_url + "/models", headers=self._probe_headers(), params=self._params,
                                     timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as resp:
            if resp.status != 200:
                return []
            raw = await read_bounded(resp.content, 4 * 1024 * 1024)
        try:
            data = json.loads(raw).get("data")
        except (ValueError, AttributeError):
            return []
        if not isinstance(data, list):
            return []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]

    def _probe_headers(self) -> dict[str, str]:
        return {k: v for k, v in self._headers.items() if k not in ("Accept", "Content-Type")}
