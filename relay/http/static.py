"""``GET /static/{path}``: the page's files, and nothing else.

Our own handler rather than aiohttp's ``add_static`` because its answers to a bad path are
uneven (some are an empty ``application/octet-stream`` 404), and its content types come from
the host's ``/etc/mime.types``, which differs between machines.  Here a path is served only
when every segment is a plain name (no ``..``, no backslash, no NUL, nothing that decodes to
them), it resolves inside the root without following a symlink out of it, and it is a regular
file; anything else is a 404 that says so.  There is no directory listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from relay.http.errors import error_response

#: Content types by suffix; anything else is served as bytes the browser must not interpret.
TYPES: Final = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2", ".woff": "font/woff", ".map": "application/json",
}
_BAD_CHARS: Final = frozenset("\\\0%:") | frozenset(chr(c) for c in range(32))


def _not_found(why: str) -> web.Response:
    return error_response(404, f"no such file: {why}", code="not_found")


def resolve(root: Path, rel: str) -> Path | None:
    """The file under ``root`` that ``rel`` names, or None when it names nothing servable."""
    parts = rel.split("/")
    if not rel or any(not p or p in (".", "..") or p.startswith(".") or _BAD_CHARS & set(p) for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        # No symlinks at all: resolve() must land exactly where the plain join does.
        if path.resolve(strict=True) != root.resolve(strict=True).joinpath(*parts) or not path.is_file():
            return None
    except (OSError, RuntimeError):
        return None
    return path


def handler(root: Path) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        # match_info is already percent-decoded once; a "%" left over was double-encoded.
        path = resolve(root, request.match_info["path"])
        if path is None:
            return _not_found("the path must name a file of the page (no '..', backslashes, dot files, "
                              "encoded characters or directories)")
        content_type = TYPES.get(path.suffix.lower(), "application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": content_type})
    return serve
