"""Read user data files row by row; bad rows become rejects with file, line and reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Data that cannot be used at all (or a bad row under --strict); names the file and line."""


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    raw: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "raw": self.raw[:2000]}


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """Yield (line number, row) or (line number, Reject), one line at a time; blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with path.open("rb") as fh:
        for number, raw_bytes in enumerate(fh, start=1):
            if number == 1 and raw_bytes.startswith(b"\xef\xbb\xbf"):
                raw_bytes = raw_bytes[3:]  # a UTF-8 byte order mark
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, Reject(str(path), number, f"invalid UTF-8 at byte {exc.start}", raw_bytes.decode("utf-8", "replace"))
                continue
            text = raw.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, Reject(str(path), number, f"invalid JSON: {exc.msg} at column {exc.colno}", text)
                continue
            if not isinstance(row, dict):
                yield number, Reject(str(path), number, f"a row must be a JSON object, got {type(row).__name__}", text)
                continue
            yield number, row
