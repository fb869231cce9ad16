"""Access tokens, who a client is, and the signed stream capabilities EventSource uses.

Tokens live in a file (``--tokens-file``), one per line, either the token itself or
``sha256:<hex digest of the token>`` (a file that holds no secret); only SHA-256 digests are kept
in memory, and a presented token is compared digest to digest with ``hmac.compare_digest``
against every entry, so neither the comparison nor the table lookup depends on how much of a
token an attacker has guessed.  ``Access.reload()`` (SIGHUP) re-reads the file: a removed token
stops working at once; a file that cannot be read keeps the old set.

EventSource cannot send headers, so it cannot send ``Authorization``.  Instead, ``POST /chat``
(authenticated by its header, ``Accept: application/json``) returns an ``events`` URL carrying
a capability for that one stream: ``/chat/{id}?exp=...&sig=...``, with ``sig`` an HMAC-SHA256,
under a per-process random secret, of the stream id, the expiry and the owner's token digest.
It grants reading and stopping that stream only, until ``exp`` (the longest the stream can
live) or until the owner's token is revoked, whichever is first.  The long-lived token never
appears in a URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from relay.config import Config, ConfigError
from relay.core.ids import is_ascii_digits
from relay.http.appkeys import ACCESS

log = logging.getLogger("relay.access")

MIN_TOKEN_LENGTH: Final = 16
HASHED: Final = "sha256:"
MAKE_ONE: Final = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def read_tokens(path: Path, *, allow_empty: bool = False) -> frozenset[bytes]:
    """The SHA-256 digests of the file's tokens; ConfigError (never quoting a token) when unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the tokens file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the tokens file {str(path)!r} is not UTF-8 text") from None
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if token.startswith(HASHED):
            # A token's digest instead of the token: the file then holds no secret and may be
            # readable by the service user (systemd's credentials are copied only at start).
            try:
                digest = bytes.fromhex(token[len(HASHED):])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"line {number} of the tokens file {str(path)!r} starts with {HASHED!r} but "
                                  "is not followed by 64 hex digits")
            digests.add(digest)
            continue
        if len(token) < MIN_TOKEN_LENGTH or not all(33 <= ord(ch) < 127 for ch in token):
            raise ConfigError(f"line {number} of the tokens file {str(path)!r} is not a usable token: a token is "
                              f"at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces "
                              f"(make one with: {MAKE_ONE})")
        digests.add(hashlib.sha256(token.encode("ascii")).digest())
    if not digests and not allow_empty:
        raise ConfigError(f"the tokens file {str(path)!r} holds no tokens (make one with: {MAKE_ONE})")
    return frozenset(digests)


class Access:
    """The current token set and the per-process secret that signs events URLs."""

    def __init__(self, config: Config) -> None:
        self.path = config.tokens_file
        self._digests: frozenset[bytes] = read_tokens(self.path) if self.path is not None else frozenset()
        # Per process unless a shared one is given (use_secret): without a shared store a restart
        # forgets every stream anyway, so their URLs may die with it.
        self._secret = secrets.token_bytes(32)
        # A capability lives as long as the stream it names can: running, then kept for replay.
        self.capability_ttl = int(config.attach_timeout + config.total_timeout + config.stream_ttl) + 1
        self.trusted: Networks = tuple(ipaddress.ip_network(p, strict=False) for p in config.trust_proxy)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def use_secret(self, secret: bytes) -> None:
        """Sign with a secret every instance shares (--signing-key-file, or kept in Redis)."""
        self._secret = secret

    def reload(self) -> bool:
        """Re-read the tokens file (SIGHUP).  On failure the old set stays and the log says why."""
        if self.path is None:
            return False
        try:
            digests = read_tokens(self.path, allow_empty=True)
        except ConfigError as exc:
            log.error("tokens not reloaded, the previous %d stay in force: %s", len(self._digests), exc)
            return False
        removed = len(self._digests - digests)
        self._digests = digests
        log.info("tokens reloaded from %s: %d in force, %d removed", self.path, len(digests), removed)
        if not digests:
            log.warning("the tokens file is empty: every request needing a token is refused")
        return True

    def owner_of(self, token: str) -> str | None:
        """The owner id (hex digest) of a valid token, else None; constant time in the token."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: bytes | None = None
        for known in self._digests:  # every entry, match or not
            if hmac.compare_digest(known, digest):
                found = known
        return found.hex() if found is not None else None

    def active(self, owner: str) -> bool:
        """Whether the token behind ``owner`` is still in force (not removed by a reload)."""
        try:
            digest = bytes.fromhex(owner)
        except ValueError:
            return False
        return any(hmac.compare_digest(known, digest) for known in self._digests)

    def _mac(self, stream_id: str, exp: int, owner: str) -> str:
        mac = hmac.new(self._secret, f"{stream_id}\n{exp}\n{owner}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def events_url(self, stream_id: str, owner: str | None, now: float | None = None) -> str:
        """The URL a client opens for a stream: bare without tokens, else with a capability."""
        if owner is None:
            return f"/chat/{stream_id}"
        exp = int(now if now is not None else time.time()) + self.capability_ttl
        return f"/chat/{stream_id}?exp={exp}&sig={self._mac(stream_id, exp, owner)}"

    def capability_error(self, stream_id: str, owner: str | None, exp: str, sig: str,
                         now: float | None = None) -> str | None:
        """Why the capability in an events URL does not open this stream; None when it does."""
        if owner is None or not is_ascii_digits(exp) or len(exp) > 12 or not sig.isascii():
            return "this events URL is not valid"
        if not hmac.compare_digest(self._mac(stream_id, int(exp), owner).encode(), sig.encode()):
            return "this events URL is not valid"
        if int(exp) < (now if now is not None else time.time()):
            return "this events URL has expired; start a new chat"
        if not self.active(owner):
            return "the access token that started this stream has been revoked"
        return None


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent a request.  Derived from the request each time it is needed (a hash and a few
    comparisons), so nothing rides on the request object between middleware and handler."""

    #: The owner id (token digest) of a valid token; None without one.
    owner: str | None
    #: Who the rate and stream limits count against: the token, else the client's address.
    identity: str
    #: The request carried a bearer token, valid or not.
    presented: bool


def client_of(request: web.Request) -> Client:
    checker = request.app[ACCESS]
    address = f"addr:{client_address(request, checker.trusted)}"
    if not checker.enabled:
        return Client(None, address, False)
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Client(None, address, False)
    found = checker.owner_of(token.strip())
    return Client(found, f"token:{found}" if found else address, True)


def owner(request: web.Request) -> str | None:
    """The token owner id the request authenticated with (None: no token, or tokens are off)."""
    return client_of(request).owner


def short(owner_id: str | None) -> str:
    """A log-safe name for a token: a prefix of its digest, never the token."""
    return f"token:{owner_id[:12]}" if owner_id else "anonymous"


def client_address(request: web.Request, trusted: Networks) -> str:
    """The client's address: the peer's, or from ``X-Forwarded-For`` when the peer is a trusted proxy.

    The header is read right to left, skipping trusted proxies, because each proxy appends the
    address it saw: everything left of the last untrusted hop is the client's to invent.  A peer
    on a Unix socket (nginx on the same host) counts as trusted when any proxy is.
    """
    peer = request.remote or ""
    if not trusted or not (peer == "" or _in(peer, trusted)):
        return peer or "unix"
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", ())
            for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else (peer or "unix")


def from_trusted_proxy(request: web.Request, trusted: Networks) -> bool:
    peer = request.remote or ""
    return bool(trusted) and (peer == "" or _in(peer, trusted))


def _in(address: str, networks: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in networks)
