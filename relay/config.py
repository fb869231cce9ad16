"""Settings: one frozen dataclass, validated once, with messages written for people.

Sources, highest first: command-line flags, environment variables, the TOML file
given by ``--config``, the defaults below.  The upstream API key is deliberately
*not* a flag (it would show in ``ps`` and shell history): it comes from
``OPENAI_API_KEY``, ``--api-key-file`` or systemd's ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from relay.upstream.config import (
    ConfigError,
    UpstreamSpec,
    check_header,
    check_proxy,
    check_url,
    parse_pairs,
    read_key_file,
)

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
        _validate(self)

    @property
    def demo(self) -> bool:
        return self.upstream is None and not self.upstreams


def _validate(c: Config) -> None:
    if not 0 <= c.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {c.port}")
    if c.upstream is not None:
        check_url(c.upstream, "--upstream")
        if c.upstreams:
            raise ConfigError("[[upstreams]] in the config file and --upstream (or OPENAI_BASE_URL) cannot be used "
                              "together: list every upstream in the file, or use the flag alone")
    _validate_upstreams(c)
    if c.upstream_proxy is not None:
        check_proxy(c.upstream_proxy, "--upstream-proxy")
    if c.upstream_proxy_auth is not None and c.upstream_proxy is None:
        raise ConfigError("--upstream-proxy-auth-file (or the credential upstream-proxy-auth) needs --upstream-proxy")
    if c.upstream_ca_file is not None and not c.upstream_ca_file.is_file():
        raise ConfigError(f"--upstream-ca-file {str(c.upstream_ca_file)!r} is not a readable file")
    positive = {
        "keepalive": c.keepalive, "keepalive-idle": c.keepalive_idle, "header-timeout": c.header_timeout, "body-timeout": c.body_timeout, "connect-timeout": c.connect_timeout,
        "first-token-timeout": c.first_token_timeout, "idle-timeout": c.idle_timeout,
        "total-timeout": c.total_timeout, "attach-timeout": c.attach_timeout,
        "stream-ttl": c.stream_ttl, "send-timeout": c.send_timeout, "cooldown": c.cooldown,
        "cooldown-max": c.cooldown_max, "down-time": c.down_time,
    }
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{name} must be a positive number of seconds, not {value}")
    if not (c.resume_grace >= 0 and math.isfinite(c.resume_grace)):
        raise ConfigError(f"--resume-grace must be zero or a positive number of seconds, not {c.resume_grace}")
    if not (c.drain_timeout >= 0 and math.isfinite(c.drain_timeout)):
        raise ConfigError(f"--drain-timeout must be zero or a positive number of seconds, not {c.drain_timeout}")
    if c.demo_token_delay < 0:
        raise ConfigError("--demo-token-delay must not be negative")
    counts = {
        "pool-limit": c.pool_limit, "max-body": c.max_body, "max-upstream-event": c.max_upstream_event,
        "max-streams": c.max_streams, "replay-bytes": c.replay_bytes, "retention-bytes": c.retention_bytes,
        "send-buffer": c.send_buffer,
        "backlog": c.backlog, "retry-ms": c.retry_ms, "max-attempts": c.max_attempts,
        "max-connections-per-client": c.max_connections_per_client,
    }
    for name, count in counts.items():
        if count < 1:
            raise ConfigError(f"--{name} must be at least 1, not {count}")
    if c.client_sndbuf < 0:
        raise ConfigError("--client-sndbuf must be 0 (the kernel's autotuning) or a number of bytes, "
                          f"not {c.client_sndbuf}")
    if c.max_connections < 0:
        raise ConfigError(f"--max-connections must be 0 (from the open-file limit) or more, not {c.max_connections}")
    for name in c.models:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"--allow-model must name a model, not {name!r}")
    if c.models and c.model is not None and c.model not in c.models:
        raise ConfigError(f"--model {c.model!r} is not one of the allowed models (--allow-model): "
                          f"{', '.join(c.models)}")
    for name in c.refuse_fields:
        if not isinstance(name, str) or not name.strip() or any(ch.isspace() for ch in name):
            raise ConfigError(f"--refuse-field must name a request field, not {name!r}")
        if name in ("messages", "model", "stream", "stream_options"):
            raise ConfigError(f"--refuse-field {name!r}: the relay cannot work without it")
    for header, header_value in c.upstream_headers:
        check_header(header, header_value)
    check_header(c.api_key_header, "x")
    if c.api_key is not None:
        if not c.api_key or any(ch in c.api_key for ch in "\r\n\0"):
            # Never echo the key itself: a message can end up in a log.
            raise ConfigError("the upstream API key is empty or contains a line break or NUL")
    if c.web_root is not None and not c.web_root.is_dir():
        raise ConfigError(f"--web-root {str(c.web_root)!r} is not a directory")
    _validate_access(c)
    _validate_redis(c)
    if c.metrics_listen is not None:
        host, port = parse_listen(c.metrics_listen, "--metrics-listen")
        if port == c.port and port != 0 and host == c.host:
            raise ConfigError("--metrics-listen must not be the relay's own address: metrics get a listener of "
                              "their own, never the public port")


def parse_listen(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback) as (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text.strip()
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} must be HOST:PORT or PORT, with a port from 0 to 65535, not {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{flag} must name an IP address (or localhost), not {host!r}") from None
    return host, int(port)


def _validate_redis(c: Config) -> None:
    if c.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (or auto), not {c.workers}")
    if c.workers > 1 and c.redis_url is None:
        raise ConfigError(f"--workers {c.workers} needs --redis URL: a reconnect can land on any worker, so "
                          "the streams must be in a store every worker shares")
    if c.redis_url is not None:
        check_redis_url(c.redis_url)
    for name, ttl in {"owner-ttl": c.owner_ttl, "presence-ttl": c.presence_ttl, "redis-timeout": c.redis_timeout,
                      "worker-timeout": c.worker_timeout}.items():
        if not (ttl > 0 and math.isfinite(ttl)):
            raise ConfigError(f"--{name} must be a positive number of seconds, not {ttl}")
    if not (0 <= c.redis_flush_ms <= 100):
        raise ConfigError(f"--redis-flush-ms must be between 0 and 100, not {c.redis_flush_ms}")
    if c.redis_log_events < 1 or c.redis_queue < 1:
        raise ConfigError("--redis-log-events and --redis-queue must be at least 1")
    if not c.redis_prefix or any(ch in c.redis_prefix for ch in "{} \t\r\n"):
        raise ConfigError(f"--redis-prefix {c.redis_prefix!r} must be a word without braces or spaces")


def check_redis_url(url: str) -> None:
    """A Redis URL the relay can use (or ``local``); the message never repeats a password in it."""
    if url == "local":
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        raise ConfigError("--redis must be local, or a redis://, rediss://, unix:// or (Redis Cluster) "
                          "redis+cluster:// URL")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("--redis must name a host: redis://HOST:PORT/DB")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError("--redis unix:// must name a socket path: unix:///run/redis/redis.sock")


def _validate_access(c: Config) -> None:
    if not is_loopback(c.host) and c.tokens_file is None and not c.allow_anonymous:
        # Safe by default: a relay reachable from a network without tokens spends the key for anyone.
        raise ConfigError(f"refusing to listen on {c.host} without access control: anyone who can reach it "
                          "could spend the upstream API key; give --tokens-file FILE, or --allow-anonymous "
                          "if something else (a firewall, an authenticating proxy) guards it")
    limits = {"max-streams-per-client": c.max_streams_per_client, "max-messages": c.max_messages,
              "max-chars": c.max_chars, "max-n": c.max_n}
    for name, count in limits.items():
        if count < 1:
            raise ConfigError(f"--{name} must be at least 1, not {count}")
    if c.rate_limit < 0:
        raise ConfigError(f"--rate-limit must be 0 (off) or a number of requests per minute, not {c.rate_limit}")
    if c.max_output_tokens is not None and c.max_output_tokens < 1:
        raise ConfigError(f"--max-output-tokens must be at least 1, not {c.max_output_tokens}")
    for host in c.allow_hosts:
        if not host or any(ch in host for ch in "/ \t\r\n\0@"):
            raise ConfigError(f"--allow-host {host!r} must be a host name or address, optionally with :port")
    for origin in c.allow_origins:
        parts = urlsplit(origin)
        if (parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")
                or parts.query or parts.fragment or "@" in parts.netloc):
            raise ConfigError(f"--allow-origin {origin!r} must be an origin such as https://app.example.com "
                              "(scheme, host and optional port; no path)")
    for proxy in c.trust_proxy:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"--trust-proxy {proxy!r} is not an IP address or CIDR network") from None


def _validate_upstreams(c: Config) -> None:
    """Every model named in the settings is served by some upstream; names are unique."""
    if not c.upstreams:
        return
    names = [spec.name for spec in c.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("[[upstreams]] names must be unique")
    if any(spec.any_model for spec in c.upstreams):
        return
    served = {visible for spec in c.upstreams for visible, _ in spec.models}
    if c.model is not None and c.model not in served:
        raise ConfigError(f"--model {c.model!r} (the default model) is served by no [[upstreams]] entry; "
                          f"served: {', '.join(sorted(served))}")
    for name in c.models:
        if name not in served:
            raise ConfigError(f"--allow-model {name!r} is served by no [[upstreams]] entry; "
                              f"served: {', '.join(sorted(served))}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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

