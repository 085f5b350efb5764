"""API keys: a public pod's port is reachable by anyone, so every route but liveness needs a key."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

OPEN_PATHS = frozenset({"/health", "/ready", "/ping", "/"})
# The web page's files are static and hold no secret: the page asks for the key itself (app/web).
OPEN_PREFIXES = ("/static/",)


def is_open(path: str, open_paths: frozenset[str] | set[str] = OPEN_PATHS) -> bool:
    """Paths served without a key: liveness, and the web page with its static files."""
    return path in open_paths or path.startswith(OPEN_PREFIXES)


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time against every key, so timing tells neither which key nor how much matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def presented_key(headers: Headers) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `X-API-Key`."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def has_access(headers: Headers, keys: list[str]) -> bool:
    """Whether a request may see everything: no keys configured (the server is open), or a valid key.

    The open routes (/health, /ready) ask this to decide how much to say: without access they
    answer the status only, since model ids and load errors tell a stranger what runs here.
    """
    if not keys:
        return True
    presented = presented_key(headers)
    return presented is not None and key_matches(presented, keys)
