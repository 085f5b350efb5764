"""Detectors: which named patterns a completion contains.

Compiled once per experiment (a chunk scores thousands of completions). Case-insensitive
substrings compare `casefold()`ed text, which also folds characters `lower()` misses (German ß).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lda.experiments.spec import DetectorSpec, regex_flags


def _matcher(spec: DetectorSpec) -> Callable[[str], bool]:
    if spec.type == "regex":
        search = re.compile(spec.pattern, regex_flags(spec.flags)).search
        return lambda text: search(text) is not None
    if spec.case_sensitive:
        patterns = spec.patterns
        return lambda text: any(p in text for p in patterns)
    folded = tuple(p.casefold() for p in spec.patterns)

    def hit(text: str) -> bool:
        text = text.casefold()
        return any(p in text for p in folded)

    return hit


class Detectors:
    """Compiled detectors, in spec order."""

    def __init__(self, specs: Sequence[DetectorSpec]) -> None:
        self.names = [spec.name for spec in specs]
        self._matchers = [(spec.name, _matcher(spec)) for spec in specs]

    def detect(self, text: str) -> list[str]:
        """Names of the detectors that hit `text`, in spec order."""
        return [name for name, hit in self._matchers if hit(text)]
