"""Every setting checked once, when the Config is made, with messages written for people.

Each message names the flag (or config file key) and what it must be; none repeats a secret
(the API key, a password in a Redis URL).
"""

from __future__ import annotations

import ipaddress
import math
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from relay.upstream.config import ConfigError, check_header, check_proxy, check_url

if TYPE_CHECKING:
    from relay.config import Config


def validate(c: Config) -> None:
    """Raise ConfigError, naming the setting and what it must be, for the first setting that is wrong."""
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
