"""The advice page: the four questions a person asks before fine-tuning, answered from the report's numbers.

fine-tune, prompt or retrieve?   the tuned model against the best prompting-only system, with the paired
                                 interval (a difference the test split cannot resolve is said to be so)
how much data?                   the learning curve of `afina advise` (what doubling the data buys)
which method, at what cost?      the method, its trainable parameters, training time and serving cost
what risks were measured?        the error bars' width, overfitting, invented facts, bias, forgetting

for question, answer in advice(report, learning_curve):
    print(question, answer)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.eval.summary import LOWER_IS_BETTER, METRIC_LABELS, primary_metric
from afina.eval.uncertainty import difference_of, interval_of

PROMPTING = ("base_fewshot", "base_rag", "base")
CURVE_PATH = Path("advise") / "learning_curve.json"


def read_learning_curve(run_root: Path) -> dict[str, Any] | None:
    path = run_root / CURVE_PATH
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def advice(report: dict[str, Any], curve: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    return [
        ("Fine-tune, prompt or retrieve?", which_system(report)),
        ("How much data?", how_much_data(report, curve)),
        ("Which method, at what cost?", method_and_cost(report)),
        ("What risks were measured?", risks_measured(report)),
    ]


def which_system(report: dict[str, Any]) -> str:
    systems = report["systems"]
    metric = primary_metric(systems)
    if metric is None or "tuned" not in systems:
        return "Not answerable from this evaluation (it needs the tuned model and a metric every system shares)."
    label = METRIC_LABELS[metric]
    sign = -1 if metric in LOWER_IS_BETTER else 1
    prompting = [s for s in PROMPTING if s in systems]
    if not prompting:
        only = f"{systems['tuned'][metric]:.2f} {label}"
        if report.get("mode") == "head":  # a new classification head: there is no model to prompt
            return (
                f"Only the tuned classifier was scored ({only}): a classification head has no prompting baseline. "
                "To compare with prompting, run the task generatively (classification.mode: generative) with "
                "eval.systems [base, base_fewshot, tuned]."
            )
        return f"Only the tuned model was scored ({only}); add base and base_rag to eval.systems."
    best = max(prompting, key=lambda s: sign * systems[s][metric])
    d = difference_of(report, "tuned", best, metric)
    value = f"tuned {systems['tuned'][metric]:.2f} vs {best} {systems[best][metric]:.2f} on {label}"
    if d is None:
        verdict = "fine-tune" if sign * (systems["tuned"][metric] - systems[best][metric]) > 0 else f"use {best}"
        answer = f"{verdict.capitalize()} ({value}; no interval for this metric)."
    elif not d["conclusive"]:
        answer = (
            f"Too close to call: {value}, difference {d['difference']:+.2f} [{d['interval'][0]:+.2f}, "
            f"{d['interval'][1]:+.2f}] over {d['rows']} test rows. Prefer the cheaper system, or test on more rows."
        )
    elif sign * d["difference"] > 0:
        answer = (
            f"Fine-tune: {value}, +{abs(d['difference']):.2f} [{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}] "
            f"better than the best prompting-only system ({best})."
        )
    else:
        answer = (
            f"Prompt or retrieve ({best}): {value}; fine-tuning is worse by {abs(d['difference']):.2f} "
            f"[{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}]."
        )
    both = difference_of(report, "tuned_rag", "tuned", metric)
    if both and both["conclusive"] and sign * both["difference"] > 0:
        answer += f" Retrieval on top of the tuned model adds {both['difference']:+.2f} more: do both."
    return answer


def how_much_data(report: dict[str, Any], curve: dict[str, Any] | None) -> str:
    if curve is None:
        return (
            "No learning curve yet: `afina advise RECIPE` trains on 10/25/50/100% of the train split and fits what "
            "more data buys."
        )
    points = ", ".join(f"{p['rows']} rows {p['value']:.1f}" for p in curve["points"])
    return f"Learning curve ({METRIC_LABELS.get(curve['metric'], curve['metric'])}): {points}. {curve['advice']}"


def method_and_cost(report: dict[str, Any]) -> str:
    training = report.get("training") or {}
    parts = []
    if training.get("trainable_parameters"):
        parts.append(f"{training['trainable_parameters']:,} trainable parameters")
    if training.get("wall_time_s") is not None:
        parts.append(
            f"{training['wall_time_s']:.0f} s of training over {training.get('steps')} steps"
            + (f" (cost {training['cost']:.4g})" if training.get("cost") else "")
        )
    if training.get("peak_memory_mb"):
        parts.append(f"peak memory {training['peak_memory_mb']:.0f} MiB")
    efficiency = report.get("efficiency") or {}
    serving = "; ".join(
        f"{s} {e['latency_p50_s']:.2f} s p50 per batch" for s, e in efficiency.items() if "latency_p50_s" in e
    )
    text = ", ".join(parts) or "training cost not recorded"
    return f"{text}. Serving: {serving}." if serving else text + "."


def risks_measured(report: dict[str, Any]) -> str:
    lines = []
    metric = primary_metric(report["systems"])
    interval = interval_of(report, "tuned", metric) if metric else None
    if metric and interval:
        lines.append(
            f"error bars: the tuned {METRIC_LABELS[metric]} is {report['systems']['tuned'][metric]:.1f} "
            f"[{interval[0]:.1f}, {interval[1]:.1f}] on {report['test_examples']} test rows "
            f"(an interval {interval[1] - interval[0]:.1f} points wide)"
        )
    overfitting = report.get("overfitting")
    if overfitting:
        lines.append("overfitting FLAGGED (see below)" if overfitting["flagged"] else "overfitting not seen")
    hallucination = report.get("hallucination")
    if hallucination and "tuned" in hallucination.get("systems", {}):
        tuned = hallucination["systems"]["tuned"]
        if "wrong_value_rate" in tuned:
            lines.append(f"wrong values in {tuned['wrong_value_rate']:.1f}% of tuned answers")
        if "held_out_assert_rate" in tuned:
            lines.append(
                f"{tuned['held_out_assert_rate']:.1f}% of tuned answers on facts absent from training assert a value"
            )
    wrong = (hallucination or {}).get("wrong_passage")
    if wrong and wrong.get("systems"):
        rates = ", ".join(f"{s} {e['assert_rate']:.1f}%" for s, e in wrong["systems"].items())
        lines.append(f"given a passage without the answer, RAG answers assert anyway: {rates}")
    bias = report.get("bias")
    if bias:
        flagged = [d for d, e in bias["dimensions"].items() if e["flagged"]]
        lines.append(f"bias FLAGGED ({', '.join(flagged)} swapped)" if flagged else "bias probe not flagged")
    forgetting = report.get("forgetting")
    if forgetting:
        lines.append(
            f"forgetting {'FLAGGED' if forgetting['flagged'] else 'within threshold'} "
            f"({forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f})"
        )
    return ("; ".join(lines) + ".") if lines else "None (an evaluation without risk measurements)."
