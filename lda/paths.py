"""Path confinement: a user-given path may only reach files under the allowed roots.

Checked on real paths (symlinks resolved), so `..` and symlinks that leave a root are caught as well.
What a caller tells the user goes through `reach`: a path outside the roots and a path where nothing
exists get the same error, naming the path only as the user gave it, so answers never show where the
roots are, what a path resolves to, or whether a file exists outside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class OutsideRoots(ValueError):
    """A path whose real location is under none of the allowed roots (`real` and `roots` are for logs,
    not for answers)."""

    def __init__(self, real: Path, roots: Sequence[Path]) -> None:
        self.real = real
        self.roots = [str(root) for root in roots]
        super().__init__("the path is outside the allowed roots")


class Unreachable(ValueError):
    """Nothing usable at a user-given path under the allowed roots: missing, outside them, or not
    resolvable (a symlink loop, no permission, a NUL byte, a name too long)."""

    def __init__(self, given: str, what: str = "file") -> None:
        self.given = given
        super().__init__(f"no {what} at {given!r} under the allowed folders")


def is_within(real: Path, roots: Sequence[Path]) -> bool:
    """Whether the resolved path `real` lies under one of `roots` (resolved here)."""
    return any(real.is_relative_to(Path(root).resolve()) for root in roots)


def confined(path: str | Path, roots: Sequence[Path]) -> Path:
    """The real path of an existing `path`, checked to lie under one of `roots`.

    Raises:
        FileNotFoundError: nothing exists at `path`.
        OSError, RuntimeError: it cannot be resolved (permissions, a symlink loop).
        OutsideRoots: its real path is under no root.
    """
    real = Path(path).resolve(strict=True)
    if not is_within(real, roots):
        raise OutsideRoots(real, roots)
    return real


def reach(path: str | Path, roots: Sequence[Path], what: str = "file", given: str | None = None) -> Path:
    """`confined(path, roots)`, with every way of failing the one `Unreachable` error.

    Args:
        what: the kind of thing named in the message ("adapter", "config").
        given: the path as the user wrote it (default `path`), the only form the message shows.
    """
    try:
        return confined(path, roots)
    except (OSError, RuntimeError, ValueError):  # missing, outside, loops, permissions, NUL bytes
        raise Unreachable(str(path) if given is None else given, what) from None
