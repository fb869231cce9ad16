"""One request's way through the pool (``Route``) and its streamed answer (``PooledResponse``),
which may move to the next upstream until something of it has reached the client.

The pool (relay/upstream/pool.py) chooses the upstreams and keeps their cooldowns; these two
carry one request: the upstreams left to try, what each attempt did, and the point
(``commit()``) after which a failure is an honest error, never a splice of two answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.upstream.chunks import Chunk
from relay.upstream.errors import UpstreamError
from relay.upstream.response import UpstreamResponse

if TYPE_CHECKING:
    from relay.upstream.pool import Member, Pool


def conversation_of(body: dict[str, Any]) -> str | None:
    """The id of the conversation a Responses request adds to (``"conv_…"`` or ``{"id": "conv_…"}``)."""
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    return conversation if isinstance(conversation, str) and conversation else None


class Route:
    """One request's way through the pool: the upstreams left to try and what each attempt did."""

    __slots__ = ("alias", "api", "attempts", "body", "conversation", "deadline", "member", "model", "order", "tried")

    def __init__(self, body: dict[str, Any], order: list[Member], deadline: float, attempts: list[str],
                 api: str = "chat", alias: str | None = None) -> None:
        self.api = api
        #: The relay's own id for this answer (a background response), remembered with the upstream's.
        self.alias = alias
        self.body = body
        #: The Conversations API object the request adds to (it lives on the upstream that answers).
        self.conversation = conversation_of(body) if api == "responses" else None
        self.model = str(body.get("model", ""))
        self.order = order
        self.deadline = deadline
        #: ``name:outcome`` per attempt, for the log line (shared with the generation).
        self.attempts = attempts
        self.tried = 0
        self.member: Member | None = None


class PooledResponse:
    """A streamed answer that may move to another upstream until ``commit()``: the generation calls
    it when the first event from this answer is in its log (from then on, nothing moves)."""

    __slots__ = ("_closed", "_committed", "_pool", "_resp", "_route")

    def __init__(self, pool: Pool, route: Route, resp: UpstreamResponse) -> None:
        self._pool = pool
        self._route = route
        self._resp = resp
        self._committed = False
        self._closed = False

    @property
    def request_id(self) -> str | None:
        return self._resp.request_id

    @property
    def finish_reason(self) -> str | None:
        return self._resp.finish_reason

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._resp.usage

    @property
    def failure(self) -> UpstreamError | None:
        """The upstream's own error event, already relayed (Responses API)."""
        return self._resp.failure

    @property
    def upstream(self) -> str:
        """The name of the upstream answering now (for metrics)."""
        member = self._route.member
        return member.name if member is not None else "-"

    def commit(self) -> None:
        self._committed = True
        # No other upstream will be asked now: the request (a whole conversation) can go.
        self._route.body = {}

    def pause(self) -> None:
        self._resp.pause()

    def resume(self) -> None:
        self._resp.resume()

    async def run(self, on_chunks: Callable[[list[Chunk]], None]) -> None:
        """Deliver the answer to ``on_chunks`` (relay/upstream/client.py), moving to the next
        upstream after a failure until ``commit()``."""
        while True:
            try:
                await self._resp.run(on_chunks)
                return
            except UpstreamError as exc:
                self._pool.timed_out(self._route, exc)
                if self._committed or not exc.failover:
                    exc.attempts = self._route.tried
                    raise
                self._resp.close()
                self._pool.failed(self._route, exc)
                self._resp = await self._pool.next_stream(self._route, exc)

    def abort(self) -> None:
        """Close, telling the upstream at once (a cancel: relay/upstream/client.py)."""
        self._resp.shutdown()
        self.close()

    def close(self) -> None:
        """Close the connection (a cancel and the producer's own end may both call this)."""
        self._resp.close()
        if self._closed:
            return
        self._closed = True
        member = self._route.member
        if member is not None:
            member.stats.add_usage(self._resp.usage)
            response_id = self._resp.response_id
            if response_id is not None:
                # Where this response lives: a request continuing it (previous_response_id) goes there.
                self._pool.remember(response_id, member.name, response_id)
                if self._route.alias is not None:
                    self._pool.remember(self._route.alias, member.name, response_id)
            if self._route.conversation is not None:
                self._pool.remember(self._route.conversation, member.name, self._route.conversation)
