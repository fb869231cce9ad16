"""Several upstreams behind one interface: routing by model, failover before the first byte, cooldowns.

A request's model picks the upstreams that serve it, lowest ``priority`` first, equal priorities
in a weighted random order.  Another upstream is tried only while nothing of the answer has
reached the client (``PooledResponse.commit()`` marks that point): on a failed connect, a
timeout before the first token, a status that is the upstream's fault (``fails_over``), a
broken or empty stream.  Once a byte of the answer is out, a failure is an honest error, never
a splice of two answers.  At most ``--max-attempts`` upstreams per request, within the one
``--total-timeout``.

An upstream that failed is cooling down (relay/upstream/cooldown.py), skipped until its time
is up; then one request tries it while the others still go elsewhere.  When every upstream for a
model is cooling down, the one that recovers first is tried anyway: a request is never refused
for a state that may already be over (and the one ``--upstream`` keeps its behaviour: every
request reaches it).  One request's way through the upstreams, and the answer that may move
until ``commit()``, are relay/upstream/route.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import aiohttp

from relay.config import Config
from relay.upstream.client import Completion, Target, UpstreamClient, UpstreamResponse
from relay.upstream.config import UpstreamSpec
from relay.upstream.cooldown import Health
from relay.upstream.errors import UpstreamError
from relay.upstream.metadata import Redactor
from relay.upstream.route import PooledResponse, Route
from relay.upstream.session import reach_of

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger("relay.upstream")

#: Responses whose upstream is remembered in this process (the oldest are forgotten past it; with
#: --redis they are in Redis as well: relay/core/redis_store.py).
ORIGINS_KEPT: Final = 100_000
#: How long an upstream's own ``/models`` list (for ``"*"``) is kept.
MODELS_TTL: Final = 60.0
MODELS_TIMEOUT: Final = 5.0


class _Reply(Protocol):
    """What an upstream attempt returns (a stream opened, or a whole completion): its status."""

    @property
    def status(self) -> int: ...


T = TypeVar("T", bound=_Reply)


@dataclass(slots=True)
class Stats:
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_usage(self, usage: Any) -> None:
        """Usage per upstream: what each one billed, for the operator's view (GET /v1/upstreams)."""
        if isinstance(usage, dict):
            self.prompt_tokens += _count(usage.get("prompt_tokens")) or _count(usage.get("input_tokens"))
            self.completion_tokens += _count(usage.get("completion_tokens")) or _count(usage.get("output_tokens"))


@dataclass(slots=True)
class Member:
    spec: UpstreamSpec
    client: UpstreamClient
    health: Health = field(default_factory=Health)
    stats: Stats = field(default_factory=Stats)
    #: Serves the Responses API: from its entry (``responses``), else None until a request tells.
    responses: bool | None = None

    def __post_init__(self) -> None:
        self.responses = self.spec.responses

    @property
    def name(self) -> str:
        return self.spec.name

    def speaks(self, api: str) -> bool:
        return api != "responses" or self.responses is not False


def _no_such_route(exc: UpstreamError) -> bool:
    """A 404 for the route itself, not for a model: no OpenAI error object with a type or code
    (FastAPI's ``{"detail": "Not Found"}``, aiohttp's ``404: Not Found``, an empty body)."""
    return exc.status == 404 and not (exc.upstream and (exc.upstream.get("type") or exc.upstream.get("code")))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Pool:
    """Every configured upstream, and the choice among them for each request."""

    def __init__(self, config: Config, members: list[Member], *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, redact: Redactor | None = None) -> None:
        self._config = config
        self.members = members
        self._clock = clock
        self._rng = rng or random.Random()
        self._models: dict[str, tuple[float, list[str]]] = {}
        #: Told of every cooldown this process starts (name, seconds, why, down) and of every
        #: recovery (name, 0, "", False): the shared store passes them to the other instances.
        self.on_health: Callable[[str, float, str, bool], None] | None = None
        #: Requests, timeouts and failovers per upstream, when metrics are on (relay/metrics.py).
        self.metrics: Metrics | None = None
        #: Response id → (the upstream that made it, its id there), newest last (``remember``).
        self._origins: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: Told of every origin remembered here (the shared store keeps it for every instance), and
        #: asked for one not known here.
        self.on_origin: Callable[[str, str, str], None] | None = None
        self.find_origin: Callable[[str], Awaitable[tuple[str, str] | None]] | None = None
        #: Blanks the keys (and pieces of them) in the health reason, which a log line and
        #: ``GET /v1/upstreams`` show: the one its clients use.
        self.redact = redact or Redactor([config.api_key, *(m.spec.api_key for m in members)])

    @classmethod
    def build(cls, session: aiohttp.ClientSession, config: Config, specs: Iterable[UpstreamSpec], *,
              clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> Pool:
        specs = list(specs)
        # Every configured key is blanked in whatever any upstream sends on: one upstream could
        # echo another's (a shared proxy in front of both).
        redact = Redactor([config.api_key, *(spec.api_key for spec in specs)])
        members = [Member(spec, UpstreamClient(session, config, target_of(spec, config), redact,
                                               reach_of(spec, config)))
                   for spec in specs]
        return cls(config, members, clock=clock, rng=rng, redact=redact)

    # -- routing ---------------------------------------------------------------------------

    def serving(self, model: str, api: str = "chat") -> list[Member]:
        return [m for m in self.members if m.spec.upstream_model(model) is not None and m.speaks(api)]

    def no_api(self, model: str, api: str) -> str | None:
        """Why ``model`` cannot be asked through ``api`` (every upstream serving it lacks the API), or None."""
        serving = self.serving(model)
        if not serving or any(m.speaks(api) for m in serving):
            return None
        names = ", ".join(m.name for m in serving)
        return (f"the model {model!r} is served only by upstreams without the Responses API ({names}); "
                "use /v1/chat/completions for it")

    def order(self, model: str, api: str = "chat") -> list[Member]:
        """The upstreams to try for ``model``, best first (see the module's docstring)."""
        now = self._clock()
        serving = self.serving(model, api)
        usable = [m for m in serving if m.health.usable(now)]
        if not usable:
            # Everything is cooling down: the one that recovers first, rather than no answer at all.
            return sorted(serving, key=lambda m: m.health.until)[:1]
        ordered: list[Member] = []
        for priority in sorted({m.spec.priority for m in usable}):
            group = [m for m in usable if m.spec.priority == priority]
            while group:
                pick = self._rng.choices(group, weights=[m.spec.weight for m in group])[0]
                group.remove(pick)
                ordered.append(pick)
        return ordered

    def route(self, body: dict[str, Any], attempts: list[str], api: str = "chat", *, upstream: str | None = None,
              alias: str | None = None) -> Route:
        deadline = asyncio.get_running_loop().time() + self._config.total_timeout
        model = str(body.get("model", ""))
        # A conversation continues where it lives: its upstream only (another would not know it).
        home = [m for m in self.serving(model, api) if m.name == upstream] if upstream is not None else []
        return Route(body, home or self.order(model, api), deadline, attempts, api, alias)

    # -- where responses live (the Responses API's previous_response_id) ------------------

    def remember(self, response_id: str, upstream: str, upstream_id: str) -> None:
        self._origins[response_id] = (upstream, upstream_id)
        self._origins.move_to_end(response_id)
        while len(self._origins) > ORIGINS_KEPT:
            self._origins.popitem(last=False)
        if self.on_origin is not None:
            self.on_origin(response_id, upstream, upstream_id)

    async def origin_of(self, response_id: str) -> tuple[str, str] | None:
        """The upstream a response was made by and its id there, if this relay made it."""
        known = self._origins.get(response_id)
        if known is None and self.find_origin is not None:
            known = await self.find_origin(response_id)
        return known

    # -- attempts --------------------------------------------------------------------------

    async def open(self, body: dict[str, Any], attempts: list[str], api: str = "chat", *,
                   upstream: str | None = None, alias: str | None = None) -> PooledResponse:
        """A streamed answer from the first upstream that gives one (``attempts`` records each try);
        ``api``: chat completions or the Responses API; ``upstream``: that one only, if it serves
        the model; ``alias``: the relay's own id for the answer."""
        route = self.route(body, attempts, api, upstream=upstream, alias=alias)
        resp = await self._attempt(route, None, lambda m, b: m.client.open(b, total_deadline=route.deadline,
                                                                           api=route.api))
        return PooledResponse(self, route, resp)

    async def next_stream(self, route: Route, failure: UpstreamError) -> UpstreamResponse:
        """After ``failure`` (already recorded), the next upstream's stream, or the last failure raised."""
        return await self._attempt(route, failure, lambda m, b: m.client.open(b, total_deadline=route.deadline,
                                                                              api=route.api))

    async def complete(self, body: dict[str, Any], attempts: list[str], api: str = "chat", *,
                       upstream: str | None = None) -> Completion:
        route = self.route(body, attempts, api, upstream=upstream)
        result = await self._attempt(route, None,
                                     lambda m, b: m.client.complete(b, total_deadline=route.deadline, api=route.api))
        if route.member is not None:
            route.member.stats.add_usage(result.obj.get("usage"))
            if api == "responses" and isinstance(result.obj.get("id"), str):
                self.remember(result.obj["id"], route.member.name, result.obj["id"])
            if route.conversation is not None:
                self.remember(route.conversation, route.member.name, route.conversation)
        return result

    async def _attempt(self, route: Route, failure: UpstreamError | None,
                       call: Callable[[Member, dict[str, Any]], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        while route.order and route.tried < self._config.max_attempts and loop.time() < route.deadline:
            member = route.order.pop(0)
            route.tried += 1
            route.member = member
            member.stats.requests += 1
            health = member.health
            if health.until != 0.0:
                health.probing = True  # half-open: this request tries it, the others go elsewhere
            # An alias: the upstream gets its own name for the model.
            upstream_body = {**route.body, "model": member.spec.upstream_model(route.model) or route.model}
            metrics = self.metrics
            try:
                result = await call(member, upstream_body)
            except UpstreamError as exc:
                if metrics is not None:
                    metrics.upstream_requests.labels(member.name, str(exc.status or "none")).inc()
                self.timed_out(route, exc)
                if route.api == "responses" and _no_such_route(exc):
                    # It does not serve the Responses API (an older vLLM, a proxy in front of chat
                    # completions only): learnt once, never asked again, another one tried now.
                    member.responses = False
                    log.warning("upstream %s does not serve the Responses API (404 on /responses): not asked "
                                "for it again", member.name)
                    route.attempts.append(f"{member.name}:no-responses-api")
                    failure = UpstreamError("upstream_error", "no upstream serving this model answers the "
                                            "Responses API", status=400, failover=False)
                    continue
                if not exc.failover:
                    # The request is at fault, not the upstream: it answered, so it is well.
                    self._recovered(member)
                    route.attempts.append(f"{member.name}:{_outcome(exc)}")
                    exc.attempts = route.tried
                    raise
                self.failed(route, exc)
                failure = exc
                continue
            except BaseException:
                health.probing = False  # cancelled mid-attempt: neither well nor failed
                raise
            if metrics is not None:
                metrics.upstream_requests.labels(member.name, str(result.status)).inc()
            self._recovered(member)
            route.attempts.append(f"{member.name}:ok")
            return result
        if failure is None:
            failure = UpstreamError("upstream_error", f"no upstream serves the model {route.model!r}")
        failure.attempts = route.tried
        raise failure

    def failed(self, route: Route, exc: UpstreamError) -> None:
        """Record a failover-able failure of the route's current upstream and start its cooldown."""
        member = route.member
        if member is None:
            return
        route.attempts.append(f"{member.name}:{_outcome(exc)}")
        member.stats.failures += 1
        if self.metrics is not None:
            self.metrics.failovers.labels(member.name).inc()
        health = member.health
        first = health.until == 0.0
        wait = health.failed(exc, self._clock(), self._config, self.redact)
        if self.on_health is not None:
            self.on_health(member.name, wait, health.why, health.down)
        # Once when it starts failing, not once per request: a dead upstream under load would
        # otherwise write a line for every request that tried it.
        (log.warning if first else log.debug)("upstream %s failed (%s); skipped for %.3g s%s", member.name,
                                              health.why, wait, "" if first else f" ({health.failures} in a row)")

    def timed_out(self, route: Route, exc: UpstreamError) -> None:
        """Count a deadline that passed on the route's current upstream."""
        if exc.timeout is not None and self.metrics is not None and route.member is not None:
            self.metrics.upstream_timeouts.labels(route.member.name, exc.timeout).inc()

    def availability(self) -> list[tuple[str, bool]]:
        """Each upstream's name and whether it is in use (not cooling down or down), for the metrics."""
        now = self._clock()
        return [(m.name, m.health.until == 0.0 or now >= m.health.until) for m in self.members]

    def _recovered(self, member: Member) -> None:
        if member.health.recovered():
            log.info("upstream %s answers again", member.name)
            if self.on_health is not None:
                self.on_health(member.name, 0.0, "", False)

    def heard(self, name: str, wait: float, why: str, down: bool) -> None:
        """Another instance started a cooldown of ``name`` (or saw it recover: ``wait`` 0)."""
        for member in self.members:
            if member.name == name:
                member.health.heard(wait, why, down, self._clock(), self._config, self.redact)

    # -- what the operator and clients see ------------------------------------------------

    def state(self) -> list[dict[str, Any]]:
        """Each upstream's state (ok / cooling down until T / down: why) and counters; no key, no URL."""
        now = self._clock()
        out = []
        for m in self.members:
            health = m.health
            entry: dict[str, Any] = {"name": m.name, "state": health.state(now), "priority": m.spec.priority,
                                     "weight": m.spec.weight, "requests": m.stats.requests,
                                     "failures": m.stats.failures, "prompt_tokens": m.stats.prompt_tokens,
                                     "completion_tokens": m.stats.completion_tokens}
            if health.until and now < health.until:
                entry["retry_in"] = round(health.until - now, 3)
                entry["why"] = health.why
            out.append(entry)
        return out

    def named_models(self) -> list[str]:
        """Every client-visible model an entry names, once, in configuration order."""
        seen: dict[str, None] = {}
        for m in self.members:
            for visible, _ in m.spec.models:
                seen.setdefault(visible)
        return list(seen)

    @property
    def any_model(self) -> bool:
        return any(m.spec.any_model for m in self.members)

    async def listed_models(self) -> list[str]:
        """``named_models`` and, for each upstream that serves ``"*"``, its own ``/models`` (cached)."""
        names = dict.fromkeys(self.named_models())
        for m in self.members:
            if not m.spec.any_model:
                continue
            for name in await self._own_models(m):
                names.setdefault(name)
        return list(names)

    async def _own_models(self, member: Member) -> list[str]:
        now = self._clock()
        cached = self._models.get(member.name)
        if cached is not None and now - cached[0] < MODELS_TTL:
            return cached[1]
        try:
            ids = await member.client.model_ids(MODELS_TIMEOUT)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            ids = cached[1] if cached is not None else []
        self._models[member.name] = (now, ids)
        return ids


def _outcome(exc: UpstreamError) -> str:
    return str(exc.status) if exc.status is not None else exc.code


def target_of(spec: UpstreamSpec, config: Config) -> Target:
    return Target(
        name=spec.name, base_url=spec.url, api_key=spec.api_key, api_key_header=spec.api_key_header,
        headers=spec.headers, query=spec.query,
        connect_timeout=spec.connect_timeout or config.connect_timeout,
        first_token_timeout=spec.first_token_timeout or config.first_token_timeout,
        idle_timeout=spec.idle_timeout or config.idle_timeout,
    )


def shortcut_spec(config: Config, base_url: str, *, name: str = "upstream") -> UpstreamSpec:
    """The one upstream of ``--upstream`` (or the demo model) as a pool entry that serves any model."""
    return UpstreamSpec(name=name, url=base_url, api_key=config.api_key, api_key_header=config.api_key_header,
                        headers=config.upstream_headers, query=config.upstream_query, any_model=True)
