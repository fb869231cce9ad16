"""Every piece of typed application state (``web.AppKey``), in one place.

The rule: a key lives here, never beside its type, and names its type for the type checker
only, so that importing the keys pulls in no module (and no import cycle) at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from relay.config import Config
    from relay.core.registry import Registry
    from relay.core.store import Store
    from relay.http.access import Access
    from relay.http.disconnects import Disconnects
    from relay.http.guard import Guard
    from relay.http.health import ReadinessProbe
    from relay.http.ratelimit import ClientLimits
    from relay.metrics import Metrics
    from relay.upstream.catalog import Catalog
    from relay.upstream.pool import Pool

CONFIG: web.AppKey[Config] = web.AppKey("config")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog")
ACCESS: web.AppKey[Access] = web.AppKey("access")
GUARD: web.AppKey[Guard] = web.AppKey("guard")
LIMITS: web.AppKey[ClientLimits] = web.AppKey("limits")
PROBE: web.AppKey[ReadinessProbe] = web.AppKey("readiness_probe")
UPSTREAMS: web.AppKey[Pool] = web.AppKey("upstreams")
STORE: web.AppKey[Store] = web.AppKey("store")
#: None unless --metrics-listen (or this is a worker whose supervisor serves them).
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")
#: What each streaming handler does when its client's connection is lost (relay/http/disconnects.py).
DISCONNECTS: web.AppKey[Disconnects] = web.AppKey("disconnects")
#: The SSE response a view opened for a request, where relay/http/crashes.py ends it should the
#: handler fail (a request key: per request, not per application).
STREAM: web.RequestKey[web.StreamResponse] = web.RequestKey("stream", web.StreamResponse)
