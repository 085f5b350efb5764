"""Path confinement now lives in `lda.paths` (the lowest library, so that `lda.experiments` needs no
sibling library for it). This module stays for importers outside the libraries that still name it."""

from lda.paths import OutsideRoots, Unreachable, confined, is_within, reach  # noqa: F401
