"""Path confinement: a user-given path may only reach files under the allowed roots.

Checked on real paths (symlinks resolved), so `..` and symlinks that leave a root are caught as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class OutsideRoots(ValueError):
    """A path whose real location is under none of the allowed roots."""

    def __init__(self, real: Path, roots: Sequence[Path]) -> None:
        self.real = real
        self.roots = [str(root) for root in roots]
        super().__init__(f"real path {str(real)!r} is outside the allowed roots {self.roots}")


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
