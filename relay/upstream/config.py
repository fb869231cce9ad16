"""The model APIs the relay sends to: ``[[upstreams]]`` entries of the TOML file, checked once.

Each entry is one upstream with its own key, headers, query, timeouts and the models it serves
(client-visible name → the upstream's own name; ``"*"``: any).  The ``--upstream`` flags are
the shortcut for one such entry.  Every problem is a ``ConfigError`` naming the entry and the
key, so a bad file stops the start with one line that says what to fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and why, for a person."""


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    #: Base URL in the OpenAI SDK's sense (``https://api.openai.com/v1``).
    url: str
    api_key: str | None = field(default=None, repr=False)
    api_key_header: str = "Authorization"
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    #: Client-visible model name → the name sent to this upstream.
    models: tuple[tuple[str, str], ...] = ()
    #: Serves any model (``"*"``), under the name the client used.
    any_model: bool = False
    #: Lower is tried first; equal priorities share load by ``weight``.
    priority: int = 0
    weight: int = 1
    #: Per attempt; None: the relay-wide setting.
    connect_timeout: float | None = None
    first_token_timeout: float | None = None
    idle_timeout: float | None = None
    #: An HTTP proxy to reach it through (``http://proxy:3128``); None: ``--upstream-proxy``, if any.
    proxy: str | None = None
    #: The proxy's ``(user, password)``, from a file or a credential, never the URL.
    proxy_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: A CA bundle trusted besides the system's store, for a private CA; None: ``--upstream-ca-file``.
    ca_file: Path | None = None
    #: A client certificate (and its key, if not in the same file) for servers that require one.
    client_cert: Path | None = None
    client_key: Path | None = None
    #: Serves the Responses API (``/responses``); None: unknown, tried, and learnt from a 404.
    responses: bool | None = None

    def upstream_model(self, model: str) -> str | None:
        """The name this upstream knows ``model`` by, or None when it does not serve it."""
        for visible, own in self.models:
            if visible == model:
                return own
        return model if self.any_model else None


ENTRY_KEYS: Final = frozenset({
    "name", "url", "key_env", "key_file", "key_credential", "api_key_header", "headers", "query", "models",
    "priority", "weight", "connect_timeout", "first_token_timeout", "idle_timeout",
    "proxy", "proxy_auth_file", "proxy_auth_credential", "ca_file", "client_cert", "client_key", "responses",
})


def check_url(url: Any, what: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be an http:// or https:// base URL, not {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an http:// or https:// base URL such as https://api.openai.com/v1, "
                          f"not {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{what} must not carry a query or fragment; use the query setting for parameters")
    return url


def check_proxy(url: Any, what: str) -> str:
    """An ``http://`` proxy URL without credentials (those come from a file: ``ps`` shows flags)."""
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be an http:// proxy URL, not {url!r}")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Never repeat the URL: it holds the password.
        raise ConfigError(f"{what} must not hold credentials (ps and logs would show them): put "
                          "USER:PASSWORD in a file (--upstream-proxy-auth-file, or proxy_auth_file per upstream)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an http:// (or https://) proxy URL such as http://proxy.internal:3128, "
                          f"not {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{what} must be a proxy's address only (scheme, host, port), not {url!r}")
    return url


def read_proxy_auth(path: Path, what: str) -> tuple[str, str]:
    """``USER:PASSWORD`` from a file; the message never repeats the file's contents."""
    user, sep, password = read_key_file(path, what).partition(":")
    if not sep or not user:
        raise ConfigError(f"{what} {str(path)!r} must hold USER:PASSWORD on one line")
    return user, password


def check_file(value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a file path")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{what} {value!r} is not a readable file")
    return path


def check_header(name: str, value: str) -> None:
    if not name or any(ch in name for ch in ":\r\n\0 \t"):
        raise ConfigError(f"upstream header name {name!r} is not a valid HTTP header name")
    if any(ch in value for ch in "\r\n\0"):
        raise ConfigError(f"the value of upstream header {name!r} contains a line break or NUL")


def parse_pairs(items: Any, sep: str, what: str) -> tuple[tuple[str, str], ...]:
    """``["a: b"]`` or ``{"a": "b"}`` → ``(("a", "b"),)``, with a one-line error naming the bad item.

    The list form is the flags' (``--upstream-header 'NAME: VALUE'``), the table form TOML's own;
    a file may use either.
    """
    if isinstance(items, Mapping):
        pairs = []
        for name, value in items.items():
            if not isinstance(value, str) or not str(name).strip():
                raise ConfigError(f"{what} {name!r} must map a name to a string value")
            pairs.append((str(name).strip(), value.strip()))
        return tuple(pairs)
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{what} must be a list of 'NAME{sep}VALUE' strings or a table")
    pairs = []
    for item in items:
        name, found, value = str(item).partition(sep)
        if not isinstance(item, str) or not found or not name.strip():
            raise ConfigError(f"{what} {item!r} is not of the form NAME{sep}VALUE")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def _read_key(entry: Mapping[str, Any], where: str, environ: Mapping[str, str]) -> str | None:
    given = [k for k in ("key_env", "key_file", "key_credential") if k in entry]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of key_env, key_file, key_credential, not {' and '.join(given)}")
    if not given:
        return None  # a local server (vLLM, llama.cpp, Ollama) without a key
    kind = given[0]
    ref = entry[kind]
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: {kind} must be a non-empty string")
    if kind == "key_env":
        key = environ.get(ref, "").strip()
        if not key:
            raise ConfigError(f"{where}: the environment variable {ref} (key_env) is not set or empty")
        return key
    if kind == "key_credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(f"{where}: key_credential needs systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)")
        path = Path(directory) / ref
    else:
        path = Path(ref)
    return read_key_file(path, f"{where}: the key file")


def _proxy_auth(entry: Mapping[str, Any], where: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    given = [k for k in ("proxy_auth_file", "proxy_auth_credential") if k in entry]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of proxy_auth_file, proxy_auth_credential, not both")
    if not given:
        return None
    ref = entry[given[0]]
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: {given[0]} must be a non-empty string")
    if given[0] == "proxy_auth_credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(f"{where}: proxy_auth_credential needs systemd's $CREDENTIALS_DIRECTORY "
                              "(LoadCredential=)")
        return read_proxy_auth(Path(directory) / ref, f"{where}: the proxy credentials")
    return read_proxy_auth(Path(ref), f"{where}: the proxy credentials file")


def read_key_file(path: Path, what: str) -> str:
    """A key from a file (surrounding whitespace dropped), or ConfigError saying why not."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"{what} {str(path)!r} is empty")
    return key


def _models(value: Any, where: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    if value == "*":
        return (), True
    if isinstance(value, list):
        names = value
        pairs = [(n, n) for n in names]
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ConfigError(f"{where}: models must be \"*\", a list of model names or a table of "
                          "client name = upstream name")
    out: list[tuple[str, str]] = []
    any_model = False
    for visible, own in pairs:
        if visible == "*" and own == "*":
            any_model = True
            continue
        if not isinstance(visible, str) or not visible.strip() or not isinstance(own, str) or not own.strip():
            raise ConfigError(f"{where}: models has an entry that is not a model name: {visible!r}")
        out.append((visible, own))
    if not out and not any_model:
        raise ConfigError(f"{where}: models is empty; name the models it serves, or \"*\"")
    return tuple(out), any_model


def _number(entry: Mapping[str, Any], key: str, where: str, *, integer: bool, low: float) -> Any:
    value = entry[key]
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < low:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {key} must be {kind} of at least {low:g}, not {value!r}")
    return value


def parse_upstreams(raw: Any, environ: Mapping[str, str] = os.environ) -> tuple[UpstreamSpec, ...]:
    """The ``upstreams`` list of the TOML file → UpstreamSpecs, or ConfigError naming entry and key."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("upstreams must be a non-empty list of [[upstreams]] tables")
    specs: list[UpstreamSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw, 1):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"[[upstreams]] entry {i} is not a table")
        name = entry.get("name")
        where = f"[[upstreams]] entry {i}" + (f" ({name!r})" if isinstance(name, str) else "")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(ENTRY_KEYS))})")
        if not isinstance(name, str) or not name.strip() or any(ch.isspace() or ch in ",:=" for ch in name):
            raise ConfigError(f"{where}: name must be a short name without spaces, commas, colons or '='")
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is used by another entry")
        seen.add(name)
        if "url" not in entry:
            raise ConfigError(f"{where}: url is required")
        url = check_url(entry["url"], f"{where}: url")
        if "models" not in entry:
            raise ConfigError(f"{where}: models is required (a list, a table of aliases, or \"*\")")
        models, any_model = _models(entry["models"], where)
        headers = parse_pairs(entry.get("headers", ()), ":", f"{where}: headers")
        for header, value in headers:
            check_header(header, value)
        query = parse_pairs(entry.get("query", ()), "=", f"{where}: query")
        key_header = entry.get("api_key_header", "Authorization")
        if not isinstance(key_header, str):
            raise ConfigError(f"{where}: api_key_header must be a header name")
        check_header(key_header, "")
        timeouts = {k: float(_number(entry, k, where, integer=False, low=0.001))
                    for k in ("connect_timeout", "first_token_timeout", "idle_timeout") if k in entry}
        proxy = check_proxy(entry["proxy"], f"{where}: proxy") if "proxy" in entry else None
        proxy_auth = _proxy_auth(entry, where, environ)
        if proxy_auth is not None and proxy is None:
            raise ConfigError(f"{where}: proxy_auth_file or proxy_auth_credential needs proxy")
        tls = {k: check_file(entry[k], f"{where}: {k}") for k in ("ca_file", "client_cert", "client_key")
               if k in entry}
        if "client_key" in tls and "client_cert" not in tls:
            raise ConfigError(f"{where}: client_key needs client_cert")
        responses = entry.get("responses")
        if responses is not None and not isinstance(responses, bool):
            raise ConfigError(f"{where}: responses must be true or false (whether it serves the Responses API)")
        specs.append(UpstreamSpec(
            name=name, url=url.rstrip("/"), api_key=_read_key(entry, where, environ), api_key_header=key_header,
            headers=headers, query=query, models=models, any_model=any_model,
            priority=int(_number(entry, "priority", where, integer=True, low=0)) if "priority" in entry else 0,
            weight=int(_number(entry, "weight", where, integer=True, low=1)) if "weight" in entry else 1,
            proxy=proxy, proxy_auth=proxy_auth, ca_file=tls.get("ca_file"), client_cert=tls.get("client_cert"),
            client_key=tls.get("client_key"), responses=responses, **timeouts,
        ))
    return tuple(specs)
