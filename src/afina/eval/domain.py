"""Scoring domain adaptation (`task: domain`, afina/tasks/domain.py): what continued pre-training gained on
the domain, and what it cost.

Perplexity (exp of the mean next-token loss, every token labelled once) of the base and the tuned
model on two texts, chunked exactly as in training:

    domain   the held-out test documents of the run (never trained on)
    general  general English text (afina's own sample, or domain.general_text)

Lower domain perplexity is the gain; higher general perplexity is the cost. The forgetting probe
(multiple-choice general knowledge) runs too where enabled.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from afina.data.load import DataError, Reject, iter_source

TEXTS = ("domain", "general")


def default_general_text_path() -> Path:
    return Path(str(resources.files("afina") / "eval" / "data" / "general_text.jsonl"))


def load_general_text(path: Path) -> list[dict[str, str]]:
    """General text as {"text"} rows: a JSONL file with a `text` field per line, or plain text (one row per
    paragraph)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: general text file not found (domain.general_text)")
    fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    rows = []
    for item in iter_source(path, fmt, "paragraph", None):
        if isinstance(item, Reject):
            raise DataError(item.message())
        text = item.row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{item.file}:{item.line}: a general-text row needs a non-empty string field `text`")
        rows.append({"text": text})
    if not rows:
        raise DataError(f"{path}: no general text in it")
    return rows


def count_labels(chunks: list[dict[str, list[int]]]) -> int:
    """Tokens that are scored: labelled positions after the first of each chunk (as the loss counts them)."""
    return sum(sum(1 for label in c["labels"][1:] if label != -100) for c in chunks)


def domain_verdict(report: dict[str, Any]) -> list[str]:
    """Plain sentences: the gain on the domain and the cost on general text."""
    base, tuned = report["systems"]["base"], report["systems"]["tuned"]
    change = report["change"]
    gain = 100 * (1 - change["domain"]["perplexity_ratio"])
    cost = 100 * (change["general"]["perplexity_ratio"] - 1)
    lines = [
        f"Domain perplexity {base['domain_perplexity']:.2f} -> {tuned['domain_perplexity']:.2f} "
        f"({'-' if gain >= 0 else '+'}{abs(gain):.1f}%) on {report['texts']['domain']['tokens']} held-out tokens.",
        f"General perplexity {base['general_perplexity']:.2f} -> {tuned['general_perplexity']:.2f} "
        f"({'+' if cost >= 0 else '-'}{abs(cost):.1f}%) on {report['texts']['general']['tokens']} tokens of general "
        "text.",
    ]
    if gain <= 0:
        lines.append(
            "Training did not lower the domain perplexity: train longer, raise the learning rate, or give more "
            "domain text."
        )
    elif cost > gain:
        lines.append(
            "General text lost more than the domain gained: lower the learning rate or rank, train fewer steps, "
            "or mix general text into the training data."
        )
    return lines
