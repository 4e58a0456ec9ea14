"""Print afina's dependencies (and its `test` extra) pinned to the lowest versions pyproject.toml allows.

    python scripts/lowest_requirements.py > lowest.txt && pip install -r lowest.txt

Each `>=X` lower bound becomes `==X` (upper bounds are dropped, exact pins kept), so installing the output
and running the unit tests checks that the bounds are honest (`make test-lowest`).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lowest_pin(requirement: str) -> str:
    """`transformers>=5.0,<6` -> `transformers==5.0`; a requirement without a lower bound is returned as given."""
    name = re.match(r"[A-Za-z0-9_.\-\[\]]+", requirement)
    if name is None:
        raise ValueError(f"{PYPROJECT}: cannot read the requirement {requirement!r}")
    rest = requirement[name.end() :]
    spec, _, marker = rest.partition(";")
    lower = re.search(r">=\s*([^,\s]+)", spec)
    exact = re.search(r"==\s*([^,\s]+)", spec)
    version = exact.group(1) if exact else lower.group(1) if lower else None
    pinned = name.group(0) + (f"=={version}" if version else spec.strip())
    return pinned + (f"; {marker.strip()}" if marker else "")


def main(extras: list[str]) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    for requirement in requirements:
        print(lowest_pin(requirement))


if __name__ == "__main__":
    main(sys.argv[1:] or ["test"])
