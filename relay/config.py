"""Settings: one frozen dataclass, validated once (relay/validation.py), with messages written for people.

Sources, highest first: command-line flags, environment variables, the TOML file
given by ``--config``, the defaults below.  The upstream API key is deliberately
*not* a flag (it would show in ``ps`` and shell history): it comes from
``OPENAI_API_KEY``, ``--api-key-file`` or systemd's ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from relay.upstream.config import ConfigError, UpstreamSpec, parse_pairs, read_key_file
from relay.validation import validate

__all__ = ["CREDENTIAL_NAME", "Config", "ConfigError", "UpstreamSpec", "parse_pairs", "read_api_key"]

KIB = 1024
MIB = 1024 * 1024

#: The file name systemd's ``LoadCredential=`` gives the key (see deploy/relay.service).
CREDENTIAL_NAME = "openai-api-key"


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Base URL in the OpenAI SDK's sense (``https://api.openai.com/v1``); None runs the demo model.
    upstream: str | None = None
    api_key: str | None = field(default=None, repr=False)
    #: Header that carries the key: ``Authorization`` sends ``Bearer <key>``, anything else the bare key
    #: (Azure OpenAI wants ``api-key``).
    api_key_header: str = "Authorization"
    model: str | None = None
    #: The models clients may name (``--allow-model``); empty allows any.  ``/v1/models`` lists them.
    models: tuple[str, ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()
    upstream_query: tuple[tuple[str, str], ...] = ()
    #: Ask for ``stream_options.include_usage`` so the stream's log line has token counts;
    #: off for upstreams that reject the field.
    stream_usage: bool = True
    pool_limit: int = 1000
    #: An HTTP proxy every upstream is reached through (an entry's own ``proxy`` wins).
    upstream_proxy: str | None = None
    #: The proxy's ``(user, password)``: from --upstream-proxy-auth-file or the credential
    #: ``upstream-proxy-auth``, never a flag or the URL.
    upstream_proxy_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: Take the proxy from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (off: the environment is ignored).
    upstream_trust_env: bool = False
    #: A CA bundle trusted besides the system's store for https upstreams (an entry's ``ca_file`` wins).
    upstream_ca_file: Path | None = None
    keepalive: float = 15.0
    #: Seconds an idle keep-alive connection (between requests) is kept open; aiohttp's 75 s is
    #: long for a server that holds a paid key and counts its sockets.
    keepalive_idle: float = 15.0
    #: Seconds a request line and headers may take to arrive, from a new connection's start or a
    #: kept-alive one's first byte (then 408).
    header_timeout: float = 10.0
    #: Seconds a request body may take to arrive, plus the time --max-body takes at 64 KiB/s.
    body_timeout: float = 10.0
    #: Connections one peer address may hold open (``--trust-proxy`` addresses are exempt).
    max_connections_per_client: int = 256
    #: Client connections in total; 0: from the open-file limit (relay/run/connections.py).
    max_connections: int = 0
    retry_ms: int = 2000
    connect_timeout: float = 10.0
    first_token_timeout: float = 300.0
    idle_timeout: float = 120.0
    total_timeout: float = 1800.0
    max_body: int = 1 * MIB
    max_upstream_event: int = 1 * MIB
    resume_grace: float = 5.0
    attach_timeout: float = 30.0
    stream_ttl: float = 300.0
    #: Bytes of event log kept for all finished streams together; the oldest go first past it.
    retention_bytes: int = 64 * MIB
    max_streams: int = 10_000
    replay_bytes: int = 1 * MIB
    send_buffer: int = 256 * KIB
    send_timeout: float = 30.0
    #: SO_SNDBUF of a client connection that streams (the kernel doubles it); 0: the kernel's
    #: autotuning.  Small, so a reader that stops reading is found stalled after kilobytes, not
    #: megabytes; 32 KiB in flight still carries 300 KB/s at 100 ms round trip.
    client_sndbuf: int = 16 * KIB
    backlog: int = 4096
    #: On SIGTERM, seconds that streams in flight may keep running before they end with a retriable
    #: ``shutdown`` error (deploy/relay.service's TimeoutStopSec= must stay above it).
    drain_timeout: float = 20.0
    demo_token_delay: float = 0.03
    web_root: Path | None = None
    # -- access and limits (docs/security.md) -----------------------------------------
    #: One access token per line; clients send ``Authorization: Bearer <token>``.  None: no tokens.
    tokens_file: Path | None = None
    #: Listen on a non-loopback address without tokens (another layer must guard the relay).
    allow_anonymous: bool = False
    #: ``Host`` names accepted besides the bind address and localhost (DNS rebinding); ``*``: any.
    allow_hosts: tuple[str, ...] = ()
    #: Accept requests without a ``Host`` header (HTTP/1.0 clients); off: they get 400.
    allow_missing_host: bool = False
    #: Browser origins (``https://app.example``) allowed besides the relay's own page.
    allow_origins: tuple[str, ...] = ()
    #: Proxies (addresses or CIDRs) whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed.
    trust_proxy: tuple[str, ...] = ()
    #: Requests per minute per client identity (token, else address); 0 turns the limit off.
    rate_limit: int = 60
    max_streams_per_client: int = 8
    max_messages: int = 500
    max_chars: int = 400_000
    #: Ceiling on ``max_tokens`` / ``max_completion_tokens``; None: only the upstream's own.
    max_output_tokens: int | None = None
    #: Ceiling on ``n`` (choices per request, each one billed) on /v1.
    max_n: int = 4
    #: /v1 forwards only the documented chat-completions parameters (vendor fields are a 400).
    strict_fields: bool = False
    #: Top-level /v1 fields refused besides the built-in ones that get around a guard.
    refuse_fields: tuple[str, ...] = ()
    # -- several upstreams (relay/upstream/pool.py) --------------------------------------
    #: ``[[upstreams]]`` of the TOML file; empty: the one ``upstream`` above (or the demo).
    upstreams: tuple[UpstreamSpec, ...] = ()
    #: Most upstreams tried for one request (failover happens only before the answer's first byte).
    max_attempts: int = 3
    #: Seconds an upstream that failed is skipped, doubling with each failure in a row up to
    #: ``cooldown_max``, unless it said how long (``Retry-After``).
    cooldown: float = 2.0
    cooldown_max: float = 300.0
    #: Seconds an upstream whose credentials or credit failed (401/402/403) is left alone.
    down_time: float = 600.0
    # -- beyond one process (relay/core/redis_store.py, relay/run/workers.py) ------------
    #: ``redis://``, ``rediss://`` or ``unix://``: streams, cancels and limits shared through Redis.
    redis_url: str | None = field(default=None, repr=False)
    #: From RELAY_REDIS_PASSWORD, --redis-password-file or the credential ``redis-password``.
    redis_password: str | None = field(default=None, repr=False)
    #: Every key the relay writes starts with this (several relays may share one Redis).
    redis_prefix: str = "relay"
    #: Seconds the producing instance's owner key lives unless refreshed (a third of it apart).
    owner_ttl: float = 5.0
    #: Seconds a reader on another instance counts as a listener unless it refreshes.
    presence_ttl: float = 3.0
    #: Events of one stream kept in Redis (``XADD MAXLEN ~``).
    redis_log_events: int = 50_000
    #: Events waiting to be written to Redis, for all streams together; past it, a stream is
    #: marked unreplayable elsewhere (its local readers are not affected).
    redis_queue: int = 100_000
    #: Milliseconds the Redis writer waits to gather events of many streams into one round trip.
    redis_flush_ms: float = 2.0
    #: Seconds any wait for Redis on a request's path may take before the request is served
    #: without it (and Redis counts as away until it answers again).
    redis_timeout: float = 0.25
    #: Signs events URLs; with --redis, every instance needs the same one (else kept in Redis).
    signing_key: bytes | None = field(default=None, repr=False)
    #: Worker processes (``auto``: one per CPU this process may run on); more than 1 needs --redis.
    workers: int = 1
    #: Seconds a worker may go without its heartbeat before the supervisor replaces it.
    worker_timeout: float = 30.0
    # -- observability (relay/metrics.py, relay/http/metrics_listener.py) ---------------------
    #: ``HOST:PORT`` (or ``PORT``, on loopback) of the Prometheus listener; None: no metrics.
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        validate(self)  # relay/validation.py

    @property
    def demo(self) -> bool:
        return self.upstream is None and not self.upstreams


def read_api_key(key_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The key from --api-key-file, else systemd's credentials directory, else OPENAI_API_KEY."""
    path: Path | None = Path(key_file) if key_file else None
    if path is None and environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if candidate.exists():
            path = candidate
    if path is not None:
        return read_key_file(path, "the API key file")
    return environ.get("OPENAI_API_KEY") or None


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML settings file whose keys are the flag names (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path!r} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Config)} - {"api_key", "redis_password", "signing_key", "upstream_proxy_auth"}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "api_key":
            raise ConfigError(
                f"the config file {path!r} must not hold the API key; use api-key-file, "
                "OPENAI_API_KEY or systemd credentials"
            )
        if name in ("redis_password", "signing_key", "upstream_proxy_auth"):
            raise ConfigError(f"the config file {path!r} must not hold {key!r}; use a file or the environment")
        if name not in known and name not in ("api_key_file", "redis_password_file", "signing_key_file",
                                              "upstream_proxy_auth_file"):
            raise ConfigError(f"the config file {path!r} has an unknown setting {key!r}")
        out[name] = value
    return out


def from_mapping(values: Mapping[str, Any]) -> Config:
    """Build a Config, turning type errors into ConfigError that names the setting."""
    try:
        return Config(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None

