"""The advisor's measurements inside `afina eval`: error bars, overfitting, invented facts and bias.

The task types call these after scoring their systems; each adds one section to the report
(eval/metrics.json) and plain sentences to its recommendation:

    intervals      afina.eval.uncertainty   bootstrap intervals of every metric and paired difference
    overfitting    afina.eval.overfitting   loss curves (metrics.jsonl) and the train-vs-test gap
    hallucination  afina.eval.hallucination wrong values and assertions on held-out facts (must_include rows)
    bias           afina.eval.bias          counterfactual probe, base vs tuned
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from afina.config import Recipe
from afina.eval.bias import bias_sentences, chat_bias, classification_bias, variant_rows
from afina.eval.hallucination import (
    hallucination_report,
    hallucination_sentences,
    wrong_passage_prompts,
    wrong_passage_report,
)
from afina.eval.overfitting import memorisation_gap, overfitting_report
from afina.eval.summary import METRIC_LABELS, best_system, primary_metric
from afina.eval.uncertainty import (
    COMPARED_PAIRS,
    PER_EXAMPLE_FIELDS,
    difference_sentence,
    intervals_from_predictions,
    per_system_values,
)
from afina.rundir import RunDir, read_jsonl


def add_intervals(recipe: Recipe, report: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """Intervals of every system's metrics and of the stated pairs' differences, plus the best system (on the
    primary metric) against every other, which the recommendation's headline needs to call a winner or a tie."""
    cfg = recipe.eval.risks
    report["intervals"] = intervals_from_predictions(
        predictions, report["systems"], cfg.resamples, cfg.confidence, recipe.seed, headline_pairs(report["systems"])
    )


def headline_pairs(systems: dict[str, dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """COMPARED_PAIRS and (best, other) for every other system, best by the primary metric's point estimate."""
    metric = primary_metric(systems)
    if metric is None:
        return COMPARED_PAIRS
    best = best_system(systems, metric)
    stated = set(COMPARED_PAIRS) | {(b, a) for a, b in COMPARED_PAIRS}
    return COMPARED_PAIRS + tuple((best, s) for s in systems if s != best and (best, s) not in stated)


def add_overfitting(recipe: Recipe, run: RunDir, report: dict[str, Any], memorisation: dict[str, Any] | None) -> None:
    records = read_jsonl(run.metrics) if run.metrics.is_file() else []
    report["overfitting"] = overfitting_report(records, report.get("training") or {}, recipe, memorisation)


def risk_sentences(report: dict[str, Any]) -> list[str]:
    """The recommendation's sentences about uncertainty and risks, from the report's sections."""
    lines = []
    metric = primary_metric(report["systems"])
    for d in (report.get("intervals") or {}).get("differences", []):
        if metric is not None and d["metric"] == metric and (d["system"], d["baseline"]) in COMPARED_PAIRS:
            lines.append(difference_sentence(d, METRIC_LABELS[metric]))
    overfitting = report.get("overfitting")
    if overfitting:
        lines += overfitting["advice"] or [
            "Overfitting: not seen (validation loss did not turn"
            + (", train and test scores are close)." if overfitting.get("memorisation") else ").")
        ]
    lines += hallucination_sentences(report.get("hallucination"))
    lines += bias_sentences(report.get("bias"))
    return lines


def add_classification_risks(
    recipe: Recipe,
    run: RunDir,
    report: dict[str, Any],
    predictions,
    labels: list[str],
    rows,
    systems: list[str],
    predict_labels,
    distributions,
) -> None:
    """Intervals, overfitting (the tuned model's accuracy on a sample of train rows against the test rows) and the
    bias probe (on by default). predict_labels(rows) -> labels; distributions(system, texts) -> label probabilities."""
    cfg = recipe.eval.risks
    add_intervals(recipe, report, predictions)
    memorisation = None
    train_path = run.split_path("train")
    if cfg.memorisation_rows and train_path.is_file():
        known = set(labels)
        sample = [
            r
            for r in train_sample(recipe, read_jsonl(train_path), cfg.memorisation_rows)
            if "text" in r and r.get("label") in known
        ]
        if sample:
            train_values = [100.0 * (p == r["label"]) for p, r in zip(predict_labels(sample), sample, strict=True)]
            test_values = [100.0 * p["correct"] for p in predictions if p["system"] == "tuned"]
            memorisation = memorisation_gap(
                "accuracy", train_values, test_values, cfg.resamples, cfg.confidence, recipe.seed
            )
    add_overfitting(recipe, run, report, memorisation)
    if cfg.bias is False:
        return
    probed = rows if len(rows) <= cfg.bias_rows else random.Random(recipe.seed).sample(rows, cfg.bias_rows)
    predict: dict[str, Callable[[list[str]], list[dict[str, float]]]] = {
        system: functools.partial(distributions, system) for system in systems
    }
    report["bias"] = classification_bias(
        [r["text"] for r in probed], predict, cfg.bias_threshold, cfg.resamples, cfg.confidence, recipe.seed
    )


def memorisation_metric(report: dict[str, Any]) -> str | None:
    """The primary metric when it is a mean of per-example scores (the train-vs-test gap needs one)."""
    metric = primary_metric(report["systems"])
    return metric if metric in PER_EXAMPLE_FIELDS else None


def train_sample(recipe: Recipe, train_rows: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    """A seeded sample of the train rows (each distinct id once) to score like test rows."""
    unique = list({str(r.get("id")): r for r in train_rows if "replay_from" not in r}.values())
    return unique if len(unique) <= rows else random.Random(recipe.seed).sample(unique, rows)


def chat_memorisation(
    recipe: Recipe, report: dict[str, Any], predictions: list[dict[str, Any]], train_rows, answer, score
) -> dict[str, Any] | None:
    """The tuned model answers a sample of train rows (answer(conversations) -> answers), scored by
    score(rows, answers) -> per-example dicts like the test rows; the gap on the primary metric."""
    cfg = recipe.eval.risks
    metric = memorisation_metric(report)
    if not cfg.memorisation_rows or metric is None or "tuned" not in report["systems"] or not train_rows:
        return None
    field, scale = PER_EXAMPLE_FIELDS[metric]
    sample = [r for r in train_sample(recipe, train_rows, cfg.memorisation_rows) if "messages" in r]
    if metric in ("fact_accuracy", "fact_recall"):
        sample = [r for r in sample if r.get("must_include")]
    if not sample:
        return None
    per_example = score(sample, answer([r["messages"][:-1] for r in sample]))
    train_values = [float(e[field]) * scale for e in per_example if field in e]
    test_values = list(per_system_values(predictions, metric).get("tuned", {}).values())
    if not train_values or not test_values:
        return None
    return memorisation_gap(metric, train_values, test_values, cfg.resamples, cfg.confidence, recipe.seed)


def chat_hallucination(
    recipe: Recipe, report: dict[str, Any], rows, train_rows, answers: dict[str, list[str]], prompts, answer_as
) -> None:
    """Wrong values and assertions on held-out facts (must_include rows); with a RAG system, unanswerable questions:
    answer_as(system, conversations) -> answers, on questions given another question's passages."""
    cfg = recipe.eval.risks
    report["hallucination"] = hallucination_report(
        rows, train_rows, answers, cfg.resamples, cfg.confidence, recipe.seed
    )
    rag = [s for s in recipe.eval.systems if s.endswith("_rag")]
    if not rag or not cfg.unanswerable_rows:
        return
    from afina.eval.generative import last_user_text, references_of

    picked = sorted(random.Random(recipe.seed).sample(range(len(rows)), min(len(rows), cfg.unanswerable_rows)))
    sample = [rows[i] for i in picked]
    questions = [last_user_text(r["messages"][:-1]) for r in sample]
    references = [references_of(r) for r in sample]
    kept, conversations = wrong_passage_prompts([prompts[rag[0]][i] for i in picked], sample, questions, references)
    if not kept:
        return
    wrong = wrong_passage_report(
        {system: answer_as(system, conversations) for system in rag},
        [references[i] for i in kept],
        cfg.resamples,
        cfg.confidence,
        recipe.seed,
    )
    report["hallucination"] = {**(report["hallucination"] or {}), "wrong_passage": wrong}


def chat_bias_probe(recipe: Recipe, report: dict[str, Any], rows, tokenizer, models, autocast) -> None:
    """eval.risks.bias=true: the reference answer's log-probability per token after questions with swapped terms."""
    from afina.data.format import IGNORE_INDEX, encode_chat
    from afina.eval.generative import last_user_text
    from afina.train.loss import label_logprobs

    cfg = recipe.eval.risks
    if cfg.bias is not True:
        return
    sample = rows if len(rows) <= cfg.bias_rows else random.Random(recipe.seed).sample(rows, cfg.bias_rows)
    questions = [last_user_text(r["messages"][:-1]) for r in sample]
    owners = variant_rows(questions)

    def scorer(system: str):
        def logprob(variants: list[str]) -> list[float]:
            encoded = []
            for variant, i in zip(variants, owners, strict=False):
                messages = [dict(m) for m in sample[i]["messages"]]
                last = max(j for j, m in enumerate(messages[:-1]) if m["role"] == "user")
                messages[last]["content"] = variant
                encoded.append(encode_chat(tokenizer, messages))
            model, context = models.get(system)
            with context():
                sums = label_logprobs(model, encoded, tokenizer.pad_token_id, recipe.eval.batch_size, autocast)
            counts = [sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in encoded]
            return [s / max(n, 1) for s, n in zip(sums, counts, strict=False)]

        return logprob

    systems = [s for s in ("base", "tuned") if s in report["systems"]]
    report["bias"] = chat_bias(
        questions, {s: scorer(s) for s in systems}, cfg.bias_threshold, cfg.resamples, cfg.confidence, recipe.seed
    )
