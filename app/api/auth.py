"""API keys: a public pod's port is reachable by anyone, so every route but liveness needs a key."""

from __future__ import annotations

import hmac

OPEN_PATHS = frozenset({"/health", "/ready", "/ping"})


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time against every key, so timing tells neither which key nor how much matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok
