"""Error bars: seeded bootstrap confidence intervals on every metric and every paired difference.

A test split of 48 questions cannot tell 70% from 80% apart; the point estimates alone would let a
reader believe it can. Each interval is a percentile bootstrap over the test rows (resampled with
replacement, `resamples` times, seeded): for a metric that is a mean of per-example scores (accuracy,
fact accuracy, token F1, exact match, pass@1, ROUGE) the resampled means; for a corpus metric
(macro-F1, chrF, BLEU) the metric recomputed on each resample. A difference between two systems is
*paired*: both systems answered the same rows, so each resample draws the same rows for both, which
removes the variation of question difficulty from the difference.

    values = {"base": [0, 1, 1, 0], "tuned": [1, 1, 1, 0]}
    interval = bootstrap_mean(values["tuned"])             # Interval(estimate, low, high)
    diff = paired_mean_difference(values["tuned"], values["base"])
    diff.excludes_zero                                     # False: too few rows to tell them apart

`intervals_from_predictions` computes all of it from eval/predictions.jsonl rows, so it works on a
finished run as well as inside `afina eval`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95

# Per-example fields of eval/predictions.jsonl whose mean over rows is the metric (in %, or 0..1 flags).
PER_EXAMPLE_FIELDS: dict[str, tuple[str, float]] = {
    # metric: (field, scale to the metric's unit)
    "pass@1": ("passed", 100.0),
    "accuracy": ("correct", 100.0),
    "fact_accuracy": ("correct", 100.0),
    "fact_recall": ("fact_recall", 100.0),
    "exact_match": ("exact_match", 100.0),
    "token_f1": ("token_f1", 1.0),
    "rouge1": ("rouge1", 1.0),
    "rouge2": ("rouge2", 1.0),
    "rougeL": ("rougeL", 1.0),
    # tool calling (afina.eval.tool_metrics)
    "call_decision": ("decision_correct", 100.0),
    "tool_name_accuracy": ("names_correct", 100.0),
    "argument_match": ("argument_match", 100.0),
    "call_exact_match": ("call_exact", 100.0),
    "json_validity": ("json_valid", 100.0),
}
# Metrics recomputed on each resample from the (prediction, reference) pairs.
CORPUS_METRICS = ("macro_f1", "chrf", "bleu", "entity_f1")

# The pairs of systems whose difference a reader asks about: (system, compared with).
COMPARED_PAIRS = (
    ("tuned", "base"),
    ("tuned", "base_fewshot"),
    ("tuned", "base_rag"),
    ("tuned_rag", "tuned"),
    ("tuned_rag", "base_rag"),
)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def as_list(self, digits: int = 2) -> list[float]:
        return [round(self.low, digits), round(self.high, digits)]


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean(
    values: Sequence[float], resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0
) -> Interval:
    """The mean of `values` and its percentile-bootstrap interval."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    if np.ptp(data) == 0 and data.size > 1:
        # Every row scored the same (0% or 100%): resampling cannot vary, but the true rate may well differ.
        # For a share, the Wilson score interval still says how far it may be from 0 or 1.
        scale = float(data[0]) if data[0] != 0 else 100.0
        share = float(data[0] != 0)
        low, high = wilson_interval(share * data.size, data.size, confidence)
        return Interval(float(data[0]), low * scale, high * scale)
    means = data[resample_indices(data.size, resamples, seed)].mean(axis=1)
    return Interval(float(data.mean()), *percentile_interval(means, confidence))


def wilson_interval(successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion (0..1)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def paired_mean_difference(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) over the same rows (a[i] and b[i] score row i), resampling rows for both at once."""
    if len(a) != len(b):
        raise ValueError(f"a paired difference needs the same rows: {len(a)} vs {len(b)} values")
    return bootstrap_mean(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), resamples, confidence, seed)


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 1000,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """statistic(row indices) on all n rows and on `resamples` bootstrap draws (a corpus metric)."""
    if n == 0:
        raise ValueError("bootstrap_statistic needs at least one row")
    samples = np.array([statistic(idx) for idx in resample_indices(n, resamples, seed)])
    return Interval(float(statistic(np.arange(n))), *percentile_interval(samples, confidence))


# ---- from eval/predictions.jsonl --------------------------------------------------------------------


def _corpus_statistic(metric: str, predictions: list[str], references: list[str]) -> Callable[[np.ndarray], float]:
    if metric == "macro_f1":
        labels = sorted(set(references))
        index = {label: i for i, label in enumerate(labels)}
        ref = np.array([index[r] for r in references])
        pred = np.array([index.get(p, -1) for p in predictions])

        def macro_f1(idx: np.ndarray) -> float:
            r, p = ref[idx], pred[idx]
            present = np.union1d(r, p[p >= 0])
            f1 = []
            for c in present:
                tp = np.sum((r == c) & (p == c))
                denominator = np.sum(r == c) + np.sum(p == c)
                f1.append(2.0 * tp / denominator if denominator else 0.0)
            return 100.0 * float(np.mean(f1)) if f1 else 0.0

        return macro_f1
    if metric == "entity_f1":
        return _entity_f1_statistic(predictions, references)
    return _sacrebleu_statistic(metric, predictions, references)


def _sacrebleu_statistic(metric: str, predictions: list[str], references: list[str]) -> Callable[[np.ndarray], float]:
    """Corpus BLEU or chrF of a resample from per-sentence match counts, extracted once (as sacrebleu's own
    paired bootstrap does): a resample sums counts instead of re-tokenising the corpus (1,000 resamples of
    60 sentences: seconds instead of minutes). Equal to sacrebleu.corpus_bleu / corpus_chrf on the same rows."""
    from sacrebleu.metrics import BLEU, CHRF

    scorer = CHRF() if metric == "chrf" else BLEU()
    counts = np.asarray(scorer._extract_corpus_statistics(predictions, [references]), dtype=np.int64)

    def corpus(idx: np.ndarray) -> float:
        return float(scorer._compute_score_from_stats(counts[idx].sum(axis=0)).score)

    return corpus


def _entity_f1_statistic(predictions: list[str], references: list[str]) -> Callable[[np.ndarray], float]:
    """Micro entity F1 (seqeval's entity extraction, type and span must match) from per-sentence counts, so a
    resample only sums counts. Predictions and references are space-joined tag sequences."""
    from seqeval.metrics.sequence_labeling import get_entities

    counts = []
    for pred, ref in zip(predictions, references, strict=True):
        p, g = set(get_entities(pred.split())), set(get_entities(ref.split()))
        counts.append((len(p & g), len(p), len(g)))
    tp, n_pred, n_gold = (np.array(c, dtype=float) for c in zip(*counts, strict=True))

    def entity_f1(idx: np.ndarray) -> float:
        denominator = n_pred[idx].sum() + n_gold[idx].sum()
        return 100.0 * 2.0 * tp[idx].sum() / denominator if denominator else 0.0

    return entity_f1


def per_system_values(predictions: list[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """{system: {row id: the row's score in the metric's unit}} for a metric that is a mean of row scores."""
    field, scale = PER_EXAMPLE_FIELDS[metric]
    out: dict[str, dict[str, float]] = {}
    for p in predictions:
        if field in p and p[field] is not None:
            out.setdefault(p["system"], {})[str(p["id"])] = float(p[field]) * scale
    return out


def intervals_from_predictions(
    predictions: list[dict[str, Any]],
    systems: dict[str, dict[str, Any]],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    pairs: tuple[tuple[str, str], ...] = COMPARED_PAIRS,
) -> dict[str, Any]:
    """Intervals of each system's metrics and of the compared pairs' differences (eval/metrics.json `intervals`).

    `systems` is the report's {system: {metric: value}}; a metric gets an interval where the predictions
    carry what it needs. A difference is `conclusive` when its interval excludes zero. `pairs`: (system,
    baseline) pairs to compare (default: COMPARED_PAIRS, the ones the report states).
    """
    out: dict[str, Any] = {
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "method": "percentile bootstrap over test rows; differences paired over the same rows",
        "systems": {s: {} for s in systems},
        "differences": [],
    }
    names = list(systems)
    for metric in PER_EXAMPLE_FIELDS:
        if not any(metric in systems[s] for s in names):
            continue
        values = per_system_values(predictions, metric)
        for system in names:
            if metric in systems[system] and values.get(system):
                interval = bootstrap_mean(list(values[system].values()), resamples, confidence, seed)
                out["systems"][system][metric] = interval.as_list()
        for a, b in pairs:
            if not (values.get(a) and values.get(b) and metric in systems.get(a, {}) and metric in systems.get(b, {})):
                continue
            ids = [i for i in values[a] if i in values[b]]
            if ids:
                diff = paired_mean_difference(
                    [values[a][i] for i in ids], [values[b][i] for i in ids], resamples, confidence, seed
                )
                out["differences"].append(_difference(metric, a, b, diff, len(ids)))
    for metric in CORPUS_METRICS:
        _corpus_intervals(out, predictions, systems, metric, min(resamples, 1000), confidence, seed, pairs)
    return out


def _corpus_intervals(
    out: dict[str, Any],
    predictions: list[dict[str, Any]],
    systems: dict[str, dict[str, Any]],
    metric: str,
    resamples: int,
    confidence: float,
    seed: int,
    pairs: tuple[tuple[str, str], ...] = COMPARED_PAIRS,
) -> None:
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    for p in predictions:
        if "prediction" in p and "reference" in p and metric in systems.get(p["system"], {}):
            rows.setdefault(p["system"], {})[str(p["id"])] = (str(p["prediction"]), str(p["reference"]))
    for system, by_id in rows.items():
        preds, refs = zip(*by_id.values(), strict=True)
        stat = _corpus_statistic(metric, list(preds), list(refs))
        out["systems"][system][metric] = bootstrap_statistic(stat, len(preds), resamples, confidence, seed).as_list()
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        ids = [i for i in rows[a] if i in rows[b]]
        if not ids:
            continue
        diff = bootstrap_statistic(
            _difference_statistic(
                _corpus_statistic(metric, [rows[a][i][0] for i in ids], [rows[a][i][1] for i in ids]),
                _corpus_statistic(metric, [rows[b][i][0] for i in ids], [rows[b][i][1] for i in ids]),
            ),
            len(ids),
            resamples,
            confidence,
            seed,
        )
        out["differences"].append(_difference(metric, a, b, diff, len(ids)))


def _difference_statistic(
    stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float]
) -> Callable[[np.ndarray], float]:
    return lambda idx: stat_a(idx) - stat_b(idx)


def _difference(metric: str, a: str, b: str, diff: Interval, rows: int) -> dict[str, Any]:
    return {
        "metric": metric,
        "system": a,
        "baseline": b,
        "difference": round(diff.estimate, 2),
        "interval": diff.as_list(),
        "rows": rows,
        "conclusive": diff.excludes_zero,
    }


def interval_of(report: dict[str, Any], system: str, metric: str) -> list[float] | None:
    """The report's interval of a system's metric, or None."""
    return ((report.get("intervals") or {}).get("systems", {}).get(system) or {}).get(metric)


def difference_of(report: dict[str, Any], system: str, baseline: str, metric: str) -> dict[str, Any] | None:
    for d in (report.get("intervals") or {}).get("differences", []):
        if (d["system"], d["baseline"], d["metric"]) == (system, baseline, metric):
            return d
    return None


def difference_sentence(d: dict[str, Any], label: str) -> str:
    """One plain sentence about a difference and whether the test split can tell the two systems apart."""
    low, high = d["interval"]
    head = (
        f"{d['system']} - {d['baseline']} on {label}: {d['difference']:+.2f} [{low:+.2f}, {high:+.2f}] "
        f"over {d['rows']} rows"
    )
    if d["conclusive"]:
        return head + "."
    return head + f": the test split is too small to tell these apart (the interval is {high - low:.1f} points wide)."
