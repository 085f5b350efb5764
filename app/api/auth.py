"""API keys: a public pod's port is reachable by anyone, so every route but liveness needs a key."""

from __future__ import annotations

import hmac

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
