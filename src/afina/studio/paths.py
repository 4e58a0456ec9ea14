"""Names and paths that come from a browser, checked before they touch the disk.

A run name must be a recipe name (letters, digits, `_.-`, no leading dot); a data file is a path
relative to one of the studio's folders, with no `..`, no absolute path and no symlink on the way.
Every refusal is a StudioError with status 400 that says what was wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

from afina.config import NAME_PATTERN

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md")
UPLOADS = "uploads"  # the prefix of uploaded files in a data path: uploads/<file>


class StudioError(Exception):
    """A request the studio refuses: an HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


def check_run_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name) or len(name) > 128:
        raise StudioError(
            400,
            f"run name {name!r} is not allowed: use letters, digits, '_', '.' and '-', starting with a letter or "
            "digit (no '/', no '..')",
        )
    return name


def inside(root: Path, relative: str, what: str) -> Path:
    """`relative` under `root`, refusing absolute paths, `..`, and symlinks anywhere below root."""
    if not relative or "\x00" in relative:
        raise StudioError(400, f"{what}: empty or invalid path")
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\", "~")):
        raise StudioError(400, f"{what} {relative!r}: absolute paths are not allowed; give a path inside {root}")
    if any(part == ".." for part in candidate.parts) or "\\" in relative:
        raise StudioError(400, f"{what} {relative!r}: '..' is not allowed; give a path inside {root}")
    path = root
    for part in candidate.parts:
        path = path / part
        if path.is_symlink():
            raise StudioError(400, f"{what} {relative!r}: {path} is a symbolic link, which the studio does not follow")
    if not path.resolve().is_relative_to(root.resolve()):
        raise StudioError(400, f"{what} {relative!r}: resolves outside {root}")
    return path


def check_upload_name(name: str) -> str:
    """A plain file name with a data suffix (no folders)."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name or len(name) > 200:
        raise StudioError(400, f"upload name {name!r}: give a plain file name such as chats.jsonl (no folders)")
    if not name.lower().endswith(DATA_SUFFIXES):
        raise StudioError(400, f"upload name {name!r}: a data file ends with one of {', '.join(DATA_SUFFIXES)}")
    return name
