"""``relay serve`` and ``relay demo-upstream``: flags (relay/run/flags.py), environment, config file → Config → run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.config import Config, ConfigError, from_mapping, load_file, parse_pairs, read_api_key
from relay.extras import install_hint
from relay.http.access import read_tokens
from relay.run.flags import LISTS, SETTINGS, build_parser
from relay.upstream.config import parse_upstreams, read_key_file, read_proxy_auth

log = logging.getLogger("relay")

def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Flags over environment over file over defaults; raises ConfigError for people."""
    config_path = args.config or environ.get("RELAY_CONFIG")
    values: dict[str, Any] = load_file(config_path) if config_path else {}
    key_file = args.api_key_file or values.pop("api_key_file", None)
    for _flag, dest, type_, env, _text in SETTINGS:
        cli_value = getattr(args, dest)
        if cli_value is not None:
            values[dest] = cli_value
        elif env and environ.get(env):
            try:
                values[dest] = type_(environ[env])
            except ValueError:
                raise ConfigError(f"{env}={environ[env]!r} is not a valid {type_.__name__}") from None
        elif dest in ("web_root", "tokens_file", "upstream_ca_file") and dest in values:
            values[dest] = Path(values[dest])
    if args.upstream_header is not None:
        values["upstream_headers"] = parse_pairs(args.upstream_header, ":", "--upstream-header")
    elif "upstream_headers" in values:
        values["upstream_headers"] = parse_pairs(list(values["upstream_headers"]), ":", "upstream-headers")
    if args.upstream_query is not None:
        values["upstream_query"] = parse_pairs(args.upstream_query, "=", "--upstream-query")
    elif "upstream_query" in values:
        values["upstream_query"] = parse_pairs(list(values["upstream_query"]), "=", "upstream-query")
    if args.models is not None:
        values["models"] = tuple(args.models)
    elif environ.get("RELAY_MODELS"):
        values["models"] = tuple(m.strip() for m in environ["RELAY_MODELS"].split(",") if m.strip())
    elif "models" in values:
        if not isinstance(values["models"], list):
            raise ConfigError("the config file's 'models' must be a list of model names")
        values["models"] = tuple(values["models"])
    for _flag, dest, env, _text in LISTS:
        if getattr(args, dest) is not None:
            values[dest] = tuple(getattr(args, dest))
        elif env and environ.get(env):
            values[dest] = tuple(item.strip() for item in environ[env].split(",") if item.strip())
        elif dest in values:
            if not isinstance(values[dest], list):
                raise ConfigError(f"the config file's {dest.replace('_', '-')!r} must be a list")
            values[dest] = tuple(values[dest])
    if args.stream_usage is not None:
        values["stream_usage"] = args.stream_usage
    if args.allow_anonymous is not None:
        values["allow_anonymous"] = args.allow_anonymous
    if args.allow_missing_host is not None:
        values["allow_missing_host"] = args.allow_missing_host
    if args.strict_fields is not None:
        values["strict_fields"] = args.strict_fields
    if args.upstream_trust_env is not None:
        values["upstream_trust_env"] = args.upstream_trust_env
    _proxy_auth(args, values, environ)
    if "upstreams" in values:
        if values.get("upstream"):
            raise ConfigError("[[upstreams]] in the config file and --upstream (or OPENAI_BASE_URL) cannot be used "
                              "together: list every upstream in the file, or use the flag alone")
        values["upstreams"] = parse_upstreams(values["upstreams"], environ)
    values["api_key"] = read_api_key(key_file, environ)
    _redis_settings(args, values, environ)
    if values.get("metrics_listen") and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"--metrics-listen needs the prometheus-client library: {install_hint('metrics')}")
    config = from_mapping(values)
    if config.tokens_file is not None:
        read_tokens(config.tokens_file)  # a missing or empty file stops the start, with the reason
    return config


def _proxy_auth(args: argparse.Namespace, values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """The upstream proxy's credentials: from a file or the systemd credential, never a flag."""
    auth_file = args.upstream_proxy_auth_file or values.pop("upstream_proxy_auth_file", None)
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if auth_file is None and credentials and (Path(credentials) / "upstream-proxy-auth").exists():
        auth_file = str(Path(credentials) / "upstream-proxy-auth")
    if auth_file is not None:
        values["upstream_proxy_auth"] = read_proxy_auth(Path(auth_file), "the upstream proxy credentials file")


def _redis_settings(args: argparse.Namespace, values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """--workers, and the Redis and signing secrets: from the environment, a file or a credential."""
    if args.redis_url and urlsplit(args.redis_url).password:
        raise ConfigError("--redis must not hold the password (ps shows every flag): put it in "
                          "RELAY_REDIS_PASSWORD, --redis-password-file or the systemd credential redis-password")
    if args.redis_url or environ.get("RELAY_REDIS_URL") or values.get("redis_url"):
        # The optional extra, checked before anything starts (a missing one is a setup error, exit 2).
        if importlib.util.find_spec("redis") is None:
            raise ConfigError(f"--redis needs the redis library: {install_hint('redis')}")
    workers = args.workers or environ.get("RELAY_WORKERS") or values.pop("workers", None)
    if workers is not None:
        values["workers"] = parse_workers(str(workers))
        if str(workers).strip() == "auto" and not (args.redis_url or environ.get("RELAY_REDIS_URL")
                                                   or values.get("redis_url")):
            # Whatever auto resolves to on this machine, the same command elsewhere means many.
            raise ConfigError("--workers auto needs --redis URL: a reconnect can land on any worker, so the "
                              "streams must be in a store every worker shares")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    password_file = args.redis_password_file or values.pop("redis_password_file", None)
    if password_file is None and credentials and (Path(credentials) / "redis-password").exists():
        password_file = str(Path(credentials) / "redis-password")
    if password_file is not None:
        values["redis_password"] = read_key_file(Path(password_file), "the Redis password file")
    elif environ.get("RELAY_REDIS_PASSWORD"):
        values["redis_password"] = environ["RELAY_REDIS_PASSWORD"]
    signing_file = args.signing_key_file or values.pop("signing_key_file", None)
    if signing_file is None and credentials and (Path(credentials) / "signing-key").exists():
        signing_file = str(Path(credentials) / "signing-key")
    if signing_file is not None:
        secret = read_key_file(Path(signing_file), "the signing key file")
        if len(secret) < 16:
            raise ConfigError("the signing key file must hold at least 16 characters of secret")
        values["signing_key"] = secret.encode()


def parse_workers(text: str) -> int:
    """``--workers``: a count, or ``auto`` for the CPUs this process may run on."""
    if text.strip() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--workers must be a number or auto, not {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo-upstream":
        from relay.demo import run_demo_upstream

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if not 0 <= args.port <= 65535:
            parser.error(f"--port must be between 0 and 65535, not {args.port}")
        if args.token_delay < 0:
            parser.error("--token-delay must not be negative")
        run_demo_upstream(args.host, args.port, token_delay=args.token_delay)
        return 0
    if args.log_level not in ("debug", "info", "warning", "error"):
        parser.error(f"--log-level (RELAY_LOG_LEVEL) must be debug, info, warning or error, not {args.log_level!r}")
    if args.log_format not in ("text", "json"):
        parser.error(f"--log-format (RELAY_LOG_FORMAT) must be text or json, not {args.log_format!r}")
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    from relay.logformat import setup_logging
    from relay.run import worker as worker_side
    from relay.run import workers

    worker = worker_side.worker_number()
    local = None
    if config.redis_url == "local":
        from relay.run.local_redis import URL_ENV, LocalRedis

        url = os.environ.get(URL_ENV) if worker is not None else None
        if url is None:  # the top process starts it; its workers inherit the URL
            try:
                local = LocalRedis()
            except ConfigError as exc:
                parser.error(str(exc))
            url = os.environ[URL_ENV] = local.url
        config = dataclasses.replace(config, redis_url=url, redis_password=None)
    setup_logging(args.log_level, args.log_format, worker)
    try:
        if config.workers > 1 and worker is None:
            return workers.supervise(config, sys.argv[1:] if argv is None else list(argv))
        from relay.run.server import run

        return run(config, args.loop)
    finally:
        if local is not None:
            local.stop()
