"""The request and feedback log: what was asked, what the model answered, and what users said about it.

    <log_dir>/requests.jsonl   one line per answered request: id, model, messages or prompt, answer, usage
    <log_dir>/feedback.jsonl   one line per POST /v1/feedback: response id, rating, corrected answer

`afina data from-logs` turns both into a training file for the next round (see afina.data.from_logs).

The logs hold users' conversations: the folder is created 0700 and the files 0600 (owner only), and
an existing file is narrowed to 0600 when the server opens it. A request whose client went away
is logged with "aborted": true (its partial answer is not training material). Each append starts
on a fresh line, so a line cut short by a crash costs that line only, never the next record.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

# Patterns for what a request log should not keep. They err towards masking: a long digit run is
# masked even when it is not a card number. Order matters: cards before phones (both are digits).
PII_PATTERNS = [
    ("EMAIL", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){13,19}\b")),
    ("IP", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
    ("PHONE", re.compile(r"(?<![\w])\+?\d[\d ()./-]{6,}\d\b")),
]


def redact(text: str) -> str:
    """Mask e-mail addresses, card-like digit runs, IPv4 addresses and phone numbers.

    >>> redact("mail bob@example.com or call +1 (555) 010-9999")
    'mail [EMAIL] or call [PHONE]'
    """
    for label, pattern in PII_PATTERNS:
        text = pattern.sub(f"[{label}]", text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {
            k: _redact_value(v) if k in ("content", "prompt", "answer", "correction", "comment") else v
            for k, v in value.items()
        }
    return value


class RequestLog:
    """Append-only JSONL logs, safe to write from the server's worker threads."""

    def __init__(self, log_dir: str | Path, redact_pii: bool = False, remember: int = 100_000):
        self.dir = Path(log_dir)
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, mode=0o700)
        self.requests = self.dir / "requests.jsonl"
        self.feedback = self.dir / "feedback.jsonl"
        for path in (self.requests, self.feedback):
            if path.exists():
                path.chmod(0o600)
        self.redact_pii = redact_pii
        self._lock = threading.Lock()
        # Response ids this log holds, so feedback for an unknown id is refused (newest kept).
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        if self.requests.is_file():
            with self.requests.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        self._remember_id(json.loads(line)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue

    def _remember_id(self, rid: str) -> None:
        self._ids[rid] = None
        while len(self._ids) > self._remember:
            self._ids.popitem(last=False)

    def knows(self, rid: str) -> bool:
        with self._lock:
            return rid in self._ids

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        if self.redact_pii:
            row = {
                k: _redact_value(v) if k in ("messages", "prompt", "answer", "correction", "comment") else v
                for k, v in row.items()
            }
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short by a crash: leave it alone
                    line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)

    def log_request(
        self,
        rid: str,
        endpoint: str,
        model: str,
        request: dict[str, Any],
        answer: str,
        usage: dict[str, int],
        latency_s: float,
    ) -> None:
        row = {
            "id": rid,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "endpoint": endpoint,
            "model": model,
            **request,
            "answer": answer,
            "usage": usage,
            "latency_s": round(latency_s, 4),
        }
        self._append(self.requests, row)
        with self._lock:
            self._remember_id(rid)

    def log_feedback(self, rid: str, rating: int | None, correction: str | None, comment: str | None) -> None:
        self._append(
            self.feedback,
            {
                "id": rid,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "rating": rating,
                "correction": correction,
                "comment": comment,
            },
        )
