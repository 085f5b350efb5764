"""Print pyproject.toml's dependencies (and the named extras) with their upper bounds lifted.

`make test-latest` installs these with `pip install --upgrade`, so the suite runs against the
newest releases the lower bounds allow: `<` and `<=` clauses are dropped, `==` and `~=` become
`>=`, `!=` exclusions and environment markers stay.

    python tests/tools/uncapped_requirements.py pyproject.toml [EXTRA ...]
"""

from __future__ import annotations

import re
import sys
import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*([^;]*?)\s*(;.*)?$")


def uncap(requirement: str) -> str:
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    name, specifiers, marker = match.groups()
    kept = []
    for clause in filter(None, (c.strip() for c in specifiers.split(","))):
        if clause.startswith("<"):
            continue
        if clause.startswith(("==", "~=")):
            clause = ">=" + clause[2:].strip().removesuffix(".*")
        kept.append(clause)
    return name + ",".join(kept) + (marker or "")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project.get("optional-dependencies", {})
    unknown = [e for e in argv[1:] if e not in extras]
    if unknown:
        print(f"unknown extras {unknown}; pyproject.toml has {sorted(extras)}", file=sys.stderr)
        return 2
    requirements = list(project.get("dependencies", []))
    for extra in argv[1:]:
        requirements += extras[extra]
    for requirement in requirements:
        print(uncap(requirement))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
