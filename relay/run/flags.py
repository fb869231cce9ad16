"""What ``relay serve`` accepts: every flag, its environment variable, its group in ``--help``.

The defaults shown are the Config's own (relay/config.py); relay/run/cli.py turns what was given
into a Config (flags over the environment over the config file over the defaults).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from relay import __version__
from relay.config import Config

# (flag, dest, type, environment variable, help).  The defaults are the Config's own.
SETTINGS: list[tuple[str, str, Any, str | None, str]] = [
    ("--host", "host", str, "RELAY_HOST", "address to listen on"),
    ("--port", "port", int, "RELAY_PORT", "port to listen on"),
    ("--upstream", "upstream", str, "OPENAI_BASE_URL",
     "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (none: the built-in demo model)"),
    ("--model", "model", str, "RELAY_MODEL", "model used when a request names none"),
    ("--api-key-header", "api_key_header", str, None,
     "header carrying the key: Authorization sends 'Bearer KEY'; e.g. api-key for Azure OpenAI"),
    ("--pool-limit", "pool_limit", int, None,
     "most upstream connections open at once, every upstream together (idle kept-alive ones included); "
     "past it a request waits for one within --connect-timeout"),
    ("--upstream-proxy", "upstream_proxy", str, "RELAY_UPSTREAM_PROXY",
     "reach the upstreams through this HTTP proxy, e.g. http://proxy.internal:3128 (credentials: "
     "--upstream-proxy-auth-file, never in the URL)"),
    ("--upstream-ca-file", "upstream_ca_file", Path, None,
     "a CA bundle trusted besides the system's store for https upstreams (a private CA)"),
    ("--keepalive", "keepalive", float, "RELAY_KEEPALIVE", "seconds of silence before a keepalive comment"),
    ("--keepalive-idle", "keepalive_idle", float, None,
     "seconds a connection may stay open without a complete request head: idle between requests "
     "(then closed), or sending its headers (slowloris: then 408 and closed)"),
    ("--header-timeout", "header_timeout", float, None,
     "seconds a request line and headers may take to arrive, from a new connection's start or a "
     "kept-alive one's first byte (then 408 and closed)"),
    ("--body-timeout", "body_timeout", float, None,
     "seconds a request body may take to arrive, plus the time --max-body takes at 64 KiB/s (then 408)"),
    ("--retry-ms", "retry_ms", int, None, "reconnect delay suggested to EventSource clients (retry:), ms"),
    ("--connect-timeout", "connect_timeout", float, None, "seconds to connect to the upstream"),
    ("--first-token-timeout", "first_token_timeout", float, None,
     "seconds from the request to the upstream's first chunk"),
    ("--idle-timeout", "idle_timeout", float, None, "most seconds of upstream silence once it has begun"),
    ("--total-timeout", "total_timeout", float, None, "most seconds for one whole answer"),
    ("--max-body", "max_body", int, None, "largest request body, bytes"),
    ("--max-upstream-event", "max_upstream_event", int, None, "largest upstream event, bytes"),
    ("--resume-grace", "resume_grace", float, "RELAY_RESUME_GRACE",
     "seconds a stream keeps running with no client, waiting for a reconnect (0: stop at once)"),
    ("--attach-timeout", "attach_timeout", float, None,
     "seconds a stream started by POST /chat (201) waits for its first client"),
    ("--stream-ttl", "stream_ttl", float, None, "seconds a finished stream stays available for replay"),
    ("--retention-bytes", "retention_bytes", int, None,
     "bytes of event logs kept for all finished streams together (the oldest go first)"),
    ("--max-streams", "max_streams", int, "RELAY_MAX_STREAMS", "most live streams (more get 503)"),
    ("--replay-bytes", "replay_bytes", int, None, "bytes of events each stream keeps for replay"),
    ("--send-buffer", "send_buffer", int, None, "bytes queued for one client before the relay waits for it"),
    ("--send-timeout", "send_timeout", float, None, "seconds a client may leave its buffer full before it is cut"),
    ("--client-sndbuf", "client_sndbuf", int, None,
     "kernel send buffer of a streaming client connection, bytes (0: autotuned); small, so a reader that "
     "stops reading is found stalled early"),
    ("--backlog", "backlog", int, None, "listen backlog (absorbs bursts of connects)"),
    ("--drain-timeout", "drain_timeout", float, "RELAY_DRAIN_TIMEOUT",
     "on SIGTERM, seconds streams in flight may run on before they end with a retriable 'shutdown' error"),
    ("--demo-token-delay", "demo_token_delay", float, None, "seconds between the demo model's tokens"),
    ("--web-root", "web_root", Path, None, "directory of the chat page (default: the page installed with the package)"),
    ("--tokens-file", "tokens_file", Path, "RELAY_TOKENS_FILE",
     "access tokens, one per line (# comments); clients send 'Authorization: Bearer TOKEN'; re-read on SIGHUP"),
    ("--rate-limit", "rate_limit", int, "RELAY_RATE_LIMIT",
     "requests per minute per client (its token, else its address); 0: no limit"),
    ("--max-streams-per-client", "max_streams_per_client", int, None,
     "most generations one client (token, else address) may run at once"),
    ("--max-messages", "max_messages", int, None, "most messages in one request"),
    ("--max-chars", "max_chars", int, None, "most characters of message content in one request"),
    ("--max-output-tokens", "max_output_tokens", int, None,
     "ceiling on max_tokens / max_completion_tokens (more: 400)"),
    ("--max-n", "max_n", int, None, "ceiling on n, the number of choices per /v1 request"),
    ("--max-connections-per-client", "max_connections_per_client", int, None,
     "connections one address may hold open, counted before any request (--trust-proxy addresses are exempt)"),
    ("--max-connections", "max_connections", int, None,
     "client connections in total (0: from the open-file limit, leaving room for upstream connections)"),
    ("--max-attempts", "max_attempts", int, None,
     "most upstreams tried for one request ([[upstreams]]; failover only before the answer's first byte)"),
    ("--cooldown", "cooldown", float, None,
     "seconds a failed upstream is skipped when it did not say (Retry-After); doubles with each failure in a row"),
    ("--cooldown-max", "cooldown_max", float, None, "longest cooldown, seconds"),
    ("--down-time", "down_time", float, None,
     "seconds an upstream whose credentials or credit were refused (401/402/403) is left alone"),
    ("--redis", "redis_url", str, "RELAY_REDIS_URL",
     "share streams, cancels and limits through Redis: local (a private redis-server the relay starts and "
     "stops: one machine), or redis://HOST:PORT/DB, rediss:// (TLS), "
     "unix:///PATH or redis+cluster://HOST:PORT (Redis Cluster: any node); the password comes from RELAY_REDIS_PASSWORD, --redis-password-file or the "
     "credential redis-password, never from this flag"),
    ("--redis-prefix", "redis_prefix", str, None, "prefix of every Redis key the relay writes"),
    ("--owner-ttl", "owner_ttl", float, None,
     "seconds after which a stream whose producing process stopped refreshing is taken as interrupted"),
    ("--presence-ttl", "presence_ttl", float, None,
     "seconds a reader on another instance counts as a listener without refreshing"),
    ("--redis-log-events", "redis_log_events", int, None, "events of one stream kept in Redis"),
    ("--redis-queue", "redis_queue", int, None,
     "events waiting for Redis, all streams together; past it a stream cannot be resumed elsewhere"),
    ("--redis-flush-ms", "redis_flush_ms", float, None,
     "milliseconds the Redis writer gathers events of many streams into one round trip"),
    ("--redis-timeout", "redis_timeout", float, None,
     "seconds a request waits for Redis before it is served without it (a resume of another instance's "
     "stream then gets a retriable 503)"),
    ("--worker-timeout", "worker_timeout", float, None,
     "seconds a worker may miss its heartbeat (a stuck event loop) before the supervisor kills and replaces it"),
    ("--metrics-listen", "metrics_listen", str, "RELAY_METRICS_LISTEN",
     "serve Prometheus metrics at /metrics on HOST:PORT (or PORT, on 127.0.0.1), a listener of its own, "
     "never the public port; with --workers the supervisor serves every worker's (needs the metrics extra)"),
]

# (flag, dest, environment variable with comma-separated values, help): repeatable flags.
LISTS: list[tuple[str, str, str | None, str]] = [
    ("--allow-host", "allow_hosts", "RELAY_ALLOW_HOSTS",
     "a Host name the relay answers besides its bind address and localhost, e.g. relay.example.com; "
     "'*': any (repeatable)"),
    ("--allow-origin", "allow_origins", "RELAY_ALLOW_ORIGINS",
     "a browser origin allowed to call the relay besides its own page, e.g. https://app.example.com "
     "(repeatable)"),
    ("--trust-proxy", "trust_proxy", "RELAY_TRUST_PROXY",
     "a proxy address or CIDR whose X-Forwarded-For / X-Forwarded-Proto are believed (repeatable)"),
    ("--refuse-field", "refuse_fields", "RELAY_REFUSE_FIELDS",
     "a top-level /v1 request field refused with a 400 instead of forwarded, e.g. provider (repeatable)"),
]


# The groups of ``relay serve --help``, in order: (title, what it is about).
_GROUPS: list[tuple[str, str]] = [
    ("deployment", "where the relay listens and how it runs"),
    ("upstreams", "the model APIs: where, with which key, through what, with which timeouts and failover"),
    ("limits and access", "who may use the relay and how much"),
    ("streams and resume", "what a client receives, keepalives, replay and send buffers"),
    ("scale-out", "worker processes and the shared store (docs/scale-out.md)"),
    ("observability", "metrics and logs (docs/observability.md)"),
]
_GROUP_OF: dict[str, str] = {
    **dict.fromkeys(("host", "port", "backlog", "drain_timeout", "web_root"), "deployment"),
    **dict.fromkeys(("upstream", "model", "api_key_header", "pool_limit", "upstream_proxy", "upstream_ca_file",
                     "connect_timeout", "first_token_timeout", "idle_timeout", "total_timeout", "max_upstream_event",
                     "max_attempts", "cooldown", "cooldown_max", "down_time", "demo_token_delay"), "upstreams"),
    **dict.fromkeys(("tokens_file", "rate_limit", "max_streams_per_client", "max_messages", "max_chars",
                     "max_output_tokens", "max_n", "max_connections_per_client", "max_connections", "max_body",
                     "header_timeout", "body_timeout", "keepalive_idle", "max_streams"), "limits and access"),
    **dict.fromkeys(("keepalive", "retry_ms", "resume_grace", "attach_timeout", "stream_ttl", "retention_bytes",
                     "replay_bytes", "send_buffer", "send_timeout", "client_sndbuf"), "streams and resume"),
    **dict.fromkeys(("redis_url", "redis_prefix", "owner_ttl", "presence_ttl", "redis_log_events", "redis_queue",
                     "redis_flush_ms", "redis_timeout", "worker_timeout"), "scale-out"),
    "metrics_listen": "observability",
}
_METAVARS: dict[str, str] = {
    "host": "ADDRESS", "upstream": "URL", "model": "MODEL", "api_key_header": "HEADER", "upstream_proxy": "URL",
    "upstream_ca_file": "FILE", "web_root": "DIR", "tokens_file": "FILE", "redis_url": "local|URL",
    "redis_prefix": "PREFIX", "metrics_listen": "HOST:PORT", "max_body": "BYTES", "max_upstream_event": "BYTES",
    "retention_bytes": "BYTES", "replay_bytes": "BYTES", "send_buffer": "BYTES", "client_sndbuf": "BYTES",
    "retry_ms": "MS", "redis_flush_ms": "MS", "allow_hosts": "HOST", "allow_origins": "ORIGIN",
    "trust_proxy": "ADDRESS|CIDR", "refuse_fields": "FIELD",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit status 2
        self.exit(2, f"relay: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="Streaming relay for LLM chat: an OpenAI-compatible "
                     "upstream in, Server-Sent Events out.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the relay", usage="relay serve [OPTIONS]", description=(
        "Run the relay.  Settings come from flags, then environment variables (named in brackets), "
        "then the --config TOML file (keys are the flag names), then the defaults shown.  The API key "
        "comes from --api-key-file, $CREDENTIALS_DIRECTORY/openai-api-key (systemd LoadCredential=) "
        "or OPENAI_API_KEY; it is never a flag."))
    groups = {name: serve.add_argument_group(name, text) for name, text in _GROUPS}
    defaults = Config()
    for flag, dest, type_, env, text in SETTINGS:
        shown = getattr(defaults, dest)
        extra = f" [{env}]" if env else ""
        default = f" (default: {shown})" if shown not in (None, (), False) else ""
        metavar = _METAVARS.get(dest) or {int: "N", float: "SECONDS", Path: "PATH"}.get(type_, "VALUE")
        groups[_GROUP_OF[dest]].add_argument(flag, dest=dest, type=type_, default=None, metavar=metavar,
                                             help=f"{text}{extra}{default}")
    deploy, up, access, streams, scale, observe = (groups[name] for name, _ in _GROUPS)
    deploy.add_argument("--config", metavar="FILE", help="TOML settings file [RELAY_CONFIG]")
    scale.add_argument("--workers", default=None, metavar="N|auto",
                       help="worker processes sharing the listening socket (auto: one per CPU this process may "
                       "use); more than 1 needs --redis [RELAY_WORKERS] (default: 1)")
    scale.add_argument("--redis-password-file", metavar="FILE", help="file holding the Redis password")
    streams.add_argument("--signing-key-file", metavar="FILE",
                         help="file holding the secret that signs events URLs, the same on every instance "
                         "(default with --redis: one kept in Redis; else a per-process random one)")
    up.add_argument("--api-key-file", metavar="FILE", help="file holding the upstream API key")
    up.add_argument("--upstream-proxy-auth-file", metavar="FILE",
                    help="file holding USER:PASSWORD for --upstream-proxy (or the systemd credential "
                    "upstream-proxy-auth)")
    up.add_argument("--upstream-trust-env", dest="upstream_trust_env", action="store_true", default=None,
                    help="take the upstream proxy from HTTPS_PROXY / HTTP_PROXY and NO_PROXY, as curl does "
                    "(default: off, the environment is ignored)")
    up.add_argument("--upstream-header", action="append", default=None, metavar="'NAME: VALUE'",
                    help="extra header sent upstream (repeatable)")
    up.add_argument("--upstream-query", action="append", default=None, metavar="NAME=VALUE",
                    help="extra query parameter sent upstream, e.g. api-version=2024-10-21 (repeatable)")
    up.add_argument("--no-stream-usage", dest="stream_usage", action="store_false", default=None,
                    help="do not ask the upstream for stream_options.include_usage (for upstreams that "
                    "reject it)")
    access.add_argument("--allow-model", dest="models", action="append", default=None, metavar="MODEL",
                        help="a model clients may name (repeatable; default: any); GET /v1/models lists them "
                        "[RELAY_MODELS, comma-separated]")
    for flag, dest, env, text in LISTS:
        access.add_argument(flag, dest=dest, action="append", default=None, metavar=_METAVARS.get(dest, "VALUE"),
                            help=f"{text}" + (f" [{env}, comma-separated]" if env else ""))
    access.add_argument("--allow-anonymous", dest="allow_anonymous", action="store_true", default=None,
                        help="listen on a non-loopback address without --tokens-file (only when something "
                        "else guards the relay)")
    access.add_argument("--allow-missing-host", dest="allow_missing_host", action="store_true", default=None,
                        help="accept requests without a Host header (HTTP/1.0 clients); by default they get 400")
    access.add_argument("--strict-fields", dest="strict_fields", action="store_true", default=None,
                        help="/v1 forwards only the documented chat-completions parameters; any vendor field "
                        "(top_k, provider, ...) is a 400 (default: vendor fields are forwarded)")
    deploy.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="event loop: uvloop (the optional extra: much less CPU per event), asyncio, "
                        "or auto: uvloop when installed (default: auto)")
    observe.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "info"),
                         choices=["debug", "info", "warning", "error"],
                         help="log level [RELAY_LOG_LEVEL] (default: info)")
    observe.add_argument("--log-format", default=os.environ.get("RELAY_LOG_FORMAT", "text"),
                         choices=["text", "json"],
                         help="text for a person or journald; json: one object per line (time, level, logger, "
                         "message, and a finished stream's fields) [RELAY_LOG_FORMAT] (default: text)")
    demo = sub.add_parser("demo-upstream", help="run only the built-in demo model (an OpenAI-compatible server)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--token-delay", type=float, default=0.03, help="seconds between tokens")
    return parser
