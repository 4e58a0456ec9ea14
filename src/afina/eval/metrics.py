"""Answer metrics a user can check by reading the predictions."""

from __future__ import annotations

import math
import re


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


def contains_all(answer: str, keys: list[str]) -> bool:
    answer = normalize(answer)
    return all(normalize(key) in answer for key in keys)


def key_recall(answer: str, keys: list[str]) -> float:
    answer = normalize(answer)
    return sum(normalize(key) in answer for key in keys) / len(keys)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def exact_match(predictions: list[str], references: list[str]) -> float:
    strip = lambda s: re.sub(r"[^\w\s]", "", normalize(s))  # noqa: E731
    return 100.0 * sum(strip(p) == strip(r) for p, r in zip(predictions, references)) / max(len(predictions), 1)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
