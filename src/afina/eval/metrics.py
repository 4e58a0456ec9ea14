"""Answer metrics a user can check by reading the predictions."""

from __future__ import annotations

import math
import re
from typing import Any


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


def classification_scores(predictions: list[str], references: list[str]) -> dict[str, Any]:
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


def label_metrics(references: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (scikit-learn), in %.

    Predictions come from the label set, so none falls outside it. Macro-F1 averages over the
    classes that occur in the references or the predictions. A class's precision is None when it
    was never predicted and its recall None when it has no reference rows: undefined, not 0.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    present = [label for label in labels if label in set(references) | set(predicted)]
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predicted, labels=present, zero_division=0
    )
    predicted_count = {label: predicted.count(label) for label in present}
    per_class = {
        label: {
            "precision": round(100.0 * float(p), 2) if predicted_count[label] else None,
            "recall": round(100.0 * float(r), 2) if s else None,
            "f1": round(100.0 * float(f), 2),
            "support": int(s),
        }
        for label, p, r, f, s in zip(present, precision, recall, f1, support)
    }
    return {
        "accuracy": 100.0 * accuracy_score(references, predicted),
        "macro_f1": 100.0 * f1_score(references, predicted, labels=present, average="macro", zero_division=0),
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": confusion_matrix(references, predicted, labels=labels).tolist()},
    }


def tag_scheme(tags: list[list[str]]) -> str:
    """IOBES when any tag is E- or S-, else IOB2."""
    return "IOBES" if any(t[:2] in ("E-", "S-") for row in tags for t in row) else "IOB2"


def entity_metrics(references: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (seqeval; an entity counts when type and span both match),
    micro over all entities and per entity type, in %."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    scheme = tag_scheme(references)
    options: dict = {}
    if scheme == "IOBES":
        from seqeval.scheme import IOBES

        options = {"mode": "strict", "scheme": IOBES}
    report = classification_report(references, predicted, output_dict=True, zero_division=0, **options)
    per_type = {
        name: {
            "precision": round(100.0 * v["precision"], 2),
            "recall": round(100.0 * v["recall"], 2),
            "f1": round(100.0 * v["f1-score"], 2),
            "support": int(v["support"]),
        }
        for name, v in report.items()
        if not name.endswith(" avg")
    }
    return {
        "entity_f1": 100.0 * f1_score(references, predicted, zero_division=0, **options),
        "entity_precision": 100.0 * precision_score(references, predicted, zero_division=0, **options),
        "entity_recall": 100.0 * recall_score(references, predicted, zero_division=0, **options),
        "per_type": per_type,
        "scheme": scheme,
    }


def length_stats(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Answer length in words against the references' (their mean per row): a summary's length is part of its
    style, and ROUGE alone rewards long answers."""
    import statistics

    answer_words = [len(p.split()) for p in predictions]
    reference_words = [statistics.mean(len(r.split()) for r in refs) for refs in references]
    ratios = [a / r for a, r in zip(answer_words, reference_words) if r]
    return {
        "words_mean": statistics.mean(answer_words) if answer_words else 0.0,
        "words_median": float(statistics.median(answer_words)) if answer_words else 0.0,
        "reference_words_mean": statistics.mean(reference_words) if reference_words else 0.0,
        "length_ratio": statistics.median(ratios) if ratios else 0.0,
        "within_50pct_of_reference": 100.0 * sum(0.5 <= r <= 1.5 for r in ratios) / len(ratios) if ratios else 0.0,
    }
