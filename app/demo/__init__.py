"""The embedded demo pair: built offline and deterministically (see `build`); not part of the HTTP layer."""

from app.demo.build import (
    DEMO_VERSION,
    MARKER,
    ROLE_TOKENS,
    DemoPaths,
    build_tokenizer,
    demo_prompts,
    ensure_demo_pair,
)

__all__ = [
    "DEMO_VERSION",
    "MARKER",
    "ROLE_TOKENS",
    "DemoPaths",
    "build_tokenizer",
    "demo_prompts",
    "ensure_demo_pair",
]
