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


def _squad_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = re.sub(r"[^\w\s]", " ", text.casefold())
    return [t for t in text.split() if t not in ("a", "an", "the")]


def token_f1_one(prediction: str, reference: str) -> float:
    """SQuAD token F1 between one answer and one reference (0..1)."""
    from collections import Counter

    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over examples of the best token F1 against any of its references, in %."""
    scores = [max(token_f1_one(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (rouge-score, stemmed), best over each example's references, in %."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, refs in zip(predictions, references):
        scored = scorer.score_multi(refs, pred)
        for key in totals:
            totals[key] += scored[key].fmeasure
    return {key: 100.0 * value / max(len(predictions), 1) for key, value in totals.items()}


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference position; short lists repeat their first reference."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, _reference_streams(references)).score)


def chrf(predictions: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(predictions, _reference_streams(references)).score)


def sentence_chrf(prediction: str, references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, references).score)


def classify(answer: str, labels: list[str]) -> str:
    """The label an answer names: an exact match, else the first label it mentions, else the answer itself."""
    norm = normalize(answer).strip(" .!")
    by_norm = {normalize(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    mentioned = [(norm.find(n), label) for n, label in by_norm.items() if n and n in norm]
    return min(mentioned)[1] if mentioned else answer.strip()


def classification_scores(predictions: list[str], references: list[str]) -> dict[str, float | list]:
    """Accuracy and macro-F1 (scikit-learn) over the reference labels, and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = sorted(set(references))
    predicted = [classify(p, labels) for p in predictions]
    shown = labels + (["(other)"] if any(p not in labels for p in predicted) else [])
    predicted = [p if p in labels else "(other)" for p in predicted]
    return {
        "accuracy": 100.0 * accuracy_score(references, predicted),
        "macro_f1": 100.0 * f1_score(references, predicted, labels=labels, average="macro", zero_division=0),
        "confusion": {"labels": shown, "matrix": confusion_matrix(references, predicted, labels=shown).tolist()},
        "predicted": predicted,
    }
