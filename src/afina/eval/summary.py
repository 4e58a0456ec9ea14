"""What every task's evaluation report shares: metric names, the primary metric, efficiency and training
cost, the recommendation sentences and the console table `afina eval` prints."""

from __future__ import annotations

import statistics
from typing import Any

from afina.device import peak_memory_mb
from afina.eval.generate import CUT_WARNING_SHARE
from afina.eval.uncertainty import COMPARED_PAIRS, difference_sentence
from afina.rundir import RunDir

METRIC_LABELS = {
    "fact_accuracy": "fact accuracy (%)",
    "fact_recall": "key facts found (%)",
    "accuracy": "accuracy (%)",
    "macro_f1": "macro-F1 (%)",
    "pass@1": "pass@1 (%)",
    "exact_match": "exact match (%)",
    "token_f1": "token F1 (%)",
    "rouge1": "ROUGE-1 F1",
    "rouge2": "ROUGE-2 F1",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU",
    "chrf": "chrF",
    "words_mean": "answer words (mean)",
    "reference_words_mean": "reference words (mean)",
    "length_ratio": "length / reference (median)",
    "within_50pct_of_reference": "length within 50% of ref (%)",
    "oos_precision": "out-of-scope precision (%)",
    "oos_recall": "out-of-scope recall (%)",
    "entity_f1": "entity F1 (%)",
    "entity_precision": "entity precision (%)",
    "entity_recall": "entity recall (%)",
    "answer_loss": "answer loss (nats/token)",
    "answer_perplexity": "answer perplexity",
    "domain_loss": "domain loss (nats/token)",
    "domain_perplexity": "domain perplexity",
    "general_loss": "general-text loss (nats/token)",
    "general_perplexity": "general-text perplexity",
    "preference_accuracy": "preference accuracy (%)",
    "preference_accuracy_per_token": "pref. accuracy per token (%)",
    "logp_margin": "log-prob margin (chosen-rejected)",
    "call_exact_match": "full-call exact match (%)",
    "call_decision": "call-or-answer decision (%)",
    "tool_name_accuracy": "tool-name accuracy (%)",
    "argument_match": "argument match (%)",
    "json_validity": "call JSON validity (%)",
}
LOWER_IS_BETTER = {
    "answer_loss",
    "answer_perplexity",
    "domain_loss",
    "domain_perplexity",
    "general_loss",
    "general_perplexity",
}
# The metric that decides "best system" and "worst examples", first one present wins.
PRIMARY_METRICS = (
    "call_exact_match",
    "preference_accuracy",
    "pass@1",
    "entity_f1",
    "accuracy",
    "fact_accuracy",
    "token_f1",
    "rougeL",
    "chrf",
    "bleu",
    "exact_match",
    "answer_loss",
)


def primary_metric(systems: dict[str, dict[str, Any]]) -> str | None:
    common = set.intersection(*(set(s) for s in systems.values())) if systems else set()
    return next((m for m in PRIMARY_METRICS if m in common), None)


def efficiency_of(generation, n: int, peak_mb: float, price_per_hour: float) -> dict[str, float]:
    import numpy as np

    seconds_per_request = generation.wall_s / max(n, 1)
    return {
        "latency_p50_s": round(float(np.percentile(generation.latency_s, 50)), 4),
        "latency_p95_s": round(float(np.percentile(generation.latency_s, 95)), 4),
        "generated_tokens_per_s": round(sum(generation.new_tokens) / max(generation.wall_s, 1e-9), 2),
        "mean_new_tokens": round(statistics.fmean(generation.new_tokens), 2),
        "wall_s": round(generation.wall_s, 3),
        "peak_memory_mb": round(peak_mb, 1),
        "cost_per_1k_requests": round(price_per_hour * seconds_per_request * 1000 / 3600, 6),
    }


def efficiency_of_batches(
    latencies: list[float], n_rows: int, wall: float, device, price_per_hour: float
) -> dict[str, float]:
    """Latency per batch, throughput, memory and cost of scoring n_rows (classification and tagging)."""
    import numpy as np

    return {
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
        "examples_per_s": round(n_rows / max(wall, 1e-9), 2),
        "wall_s": round(wall, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "cost_per_1k_requests": round(price_per_hour * wall / n_rows * 1000 / 3600, 6),
    }


def training_cost(run: RunDir, price_per_hour: float) -> dict[str, Any]:
    manifest = run.read_manifest()
    seconds = manifest.get("stages", {}).get("train", {}).get("wall_time_s")
    train = manifest.get("train", {})
    return {
        "wall_time_s": seconds,
        "cost": round(price_per_hour * seconds / 3600, 6) if seconds is not None else None,
        "steps": train.get("steps"),
        "trainable_parameters": train.get("trainable_parameters"),
        "peak_memory_mb": train.get("peak_memory_mb"),
    }


def best_system(systems: dict[str, dict[str, Any]], metric: str) -> str:
    """The system with the best point estimate on `metric`."""
    lower = metric in LOWER_IS_BETTER
    return sorted(systems, key=lambda s: systems[s][metric], reverse=not lower)[0]


def paired_difference(report: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    """The report's paired difference a - b on `metric` (from either order of the pair), or None."""
    intervals = report.get("intervals") or {}
    for d in intervals.get("differences", []) + intervals.get("headline_differences", []):
        if d["metric"] != metric:
            continue
        if (d["system"], d["baseline"]) == (a, b):
            return d
        if (d["system"], d["baseline"]) == (b, a):
            low, high = d["interval"]
            return {**d, "system": a, "baseline": b, "difference": -d["difference"], "interval": [-high, -low]}
    return None


def _signed(d: dict[str, Any]) -> str:
    low, high = d["interval"]
    return f"{d['difference']:+.2f} [{low:+.2f}, {high:+.2f}]"


def quality_sentences(report: dict[str, Any], metric: str) -> list[str]:
    """Which system is better on the primary metric, called only where the paired interval excludes zero: a
    difference whose interval crosses zero is a tie on this test split, whatever the point estimates say; among
    tied systems the clearly cheaper one to serve is recommended on that ground."""
    systems, label, lower = report["systems"], METRIC_LABELS[metric], metric in LOWER_IS_BETTER
    best = best_system(systems, metric)
    others = [s for s in systems if s != best]
    found = {s: paired_difference(report, best, s, metric) for s in others}
    diffs = {s: d for s, d in found.items() if d is not None}
    tied = [s for s in others if s in diffs and not diffs[s]["conclusive"]]
    better = [s for s in others if s in diffs and diffs[s]["conclusive"]]
    unknown = [s for s in others if s not in diffs]
    head = f"Best quality on {label}: {best} ({systems[best][metric]:.2f})"
    if tied:
        head += (
            ", tied on this test split with "
            + ", ".join(f"{s} ({systems[s][metric]:.2f}; difference {_signed(diffs[s])})" for s in tied)
            + ": the paired interval includes zero"
        )
    if better:
        head += "; better than " + ", ".join(f"{s} ({_signed(diffs[s])})" for s in better)
    if unknown:
        head += "; by point estimate only against " + ", ".join(unknown) + " (no paired interval)"
    lines = [head + "."]
    cheaper = _cheaper_among(report, [best, *tied])
    if cheaper:
        lines.append(cheaper)
    if "tuned" in systems and {"base_fewshot", "base_rag"} & set(systems):
        prompting = max(
            (s for s in ("base_fewshot", "base_rag") if s in systems),
            key=lambda s: systems[s][metric] * (-1 if lower else 1),
        )
        d = paired_difference(report, "tuned", prompting, metric)
        delta = (systems["tuned"][metric] - systems[prompting][metric]) * (-1 if lower else 1)
        if d is None:
            verdict = "beats" if delta > 0 else "trails"
            lines.append(
                f"Fine-tuning (tuned) {verdict} the best prompting-only system ({prompting}) by {abs(delta):.2f} on "
                f"{label} (point estimate; no paired interval)."
            )
        elif d["conclusive"]:
            verdict = "is better than" if delta > 0 else "is worse than"
            lines.append(
                f"Fine-tuning (tuned) {verdict} the best prompting-only system ({prompting}) on {label}: {_signed(d)}."
            )
        else:
            lines.append(
                f"Fine-tuning (tuned) and the best prompting-only system ({prompting}) are tied on {label} on this "
                f"test split: {_signed(d)} includes zero."
            )
    return lines


def _cheaper_among(report: dict[str, Any], tied: list[str]) -> str | None:
    """Among systems tied on quality, the one clearly cheaper to serve (at least 20% less per request)."""
    efficiency = report.get("efficiency") or {}
    costs = {s: efficiency[s]["wall_s"] for s in tied if s in efficiency}
    if len(costs) < 2:
        return None
    cheapest = min(costs, key=costs.__getitem__)
    runner_up = min(c for s, c in costs.items() if s != cheapest)
    if costs[cheapest] > 0.8 * runner_up:
        return None
    return (
        f"Recommended among the tied: {cheapest}, the cheapest to serve "
        f"({efficiency[cheapest]['cost_per_1k_requests']:.4f} per 1,000 requests, "
        f"{costs[cheapest]:.1f} s for the test split against {runner_up:.1f} s)."
    )


def cut_sentences(report: dict[str, Any]) -> list[str]:
    """Systems whose answers stopped at the answer budget more than a few percent of the time."""
    length = report.get("answer_length") or {}
    cut = {s: c for s, c in (length.get("cut") or {}).items() if c["share"] > CUT_WARNING_SHARE}
    if not cut:
        return []
    return [
        "Answers cut short: "
        + ", ".join(f"{s} {c['cut']} of {c['answers']}" for s, c in cut.items())
        + f" stopped at the {length['max_new_tokens']}-token cap ({length['how']}): these scores judge cut answers "
        "and may rank the systems differently from whole ones; raise eval.max_new_tokens (or leave it unset to "
        "derive it from the references) before trusting the comparison."
    ]


def recommend(report: dict[str, Any]) -> list[str]:
    """Plain sentences derived from the numbers: quality winner (or a tie, by the paired intervals), cost winner,
    forgetting."""
    systems, efficiency = report["systems"], report["efficiency"]
    metric = primary_metric(systems)
    lines = quality_sentences(report, metric) if metric else []
    lines[1:1] = cut_sentences(report)  # right under the headline: a winner called on cut answers says so
    cheapest = min(efficiency, key=lambda s: efficiency[s]["wall_s"])
    lines.append(
        f"Cheapest to serve: {cheapest} ({efficiency[cheapest]['latency_p50_s']:.3f} s p50 latency per batch, "
        f"{efficiency[cheapest]['cost_per_1k_requests']:.4f} per 1,000 requests at the recipe's price)."
    )
    forgetting = report.get("forgetting")
    if forgetting:
        if forgetting["flagged"]:
            lines.append(
                f"Forgetting: general-knowledge accuracy dropped {forgetting['drop']:.1f} points "
                f"({forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f}), beyond the "
                f"{forgetting['threshold']} point threshold: "
                "lower the learning rate or epochs, use a smaller LoRA rank, or mix general data into training."
            )
        else:
            lines.append(
                f"Forgetting: not a concern ({forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f} "
                "on "
                f"{forgetting['questions']} probe questions, threshold {forgetting['threshold']} points)."
            )
    return lines


def format_table(report: dict[str, Any]) -> str:
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if all(m in report["systems"][s] for s in systems)]
    width = max(22, *(len(METRIC_LABELS[m]) for m in metrics))
    col = max(10, *(len(s) for s in systems))
    head = f"{'metric'.ljust(width)}  " + "  ".join(s.rjust(col) for s in systems)
    lines = [f"test split: {report['test_examples']} examples", head, "-" * len(head)]
    if not metrics:
        lines.pop()
    intervals = (report.get("intervals") or {}).get("systems", {})
    if intervals:  # "70.8 [57.1, 83.3]": the value and its bootstrap interval (afina.eval.uncertainty)
        col = max(col, 20)

    def cell(system: str, metric: str) -> str:
        interval = intervals.get(system, {}).get(metric)
        text = f"{report['systems'][system][metric]:.2f}" + (
            f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else ""
        )
        return text.rjust(col)

    head = f"{'metric'.ljust(width)}  " + "  ".join(s.rjust(col) for s in systems)
    lines[1:] = [head, "-" * len(head)] if metrics else [head]
    for m in metrics:
        lines.append(f"{METRIC_LABELS[m].ljust(width)}  " + "  ".join(cell(s, m) for s in systems))
    if report.get("efficiency"):
        for key, label in (
            ("latency_p50_s", "latency p50 (s/batch)"),
            ("generated_tokens_per_s", "generated tokens/s"),
            ("examples_per_s", "examples/s"),
        ):
            if not all(key in report["efficiency"][s] for s in systems):
                continue
            lines.append(
                f"{label.ljust(width)}  " + "  ".join(f"{report['efficiency'][s][key]:{col}.2f}" for s in systems)
            )
    length = report.get("answer_length") or {}
    cut = length.get("cut") or {}
    if cut and all(s in cut for s in systems):
        label = f"answers cut at {length['max_new_tokens']} tok"
        lines.append(
            f"{label.ljust(width)}  " + "  ".join(f"{cut[s]['cut']} of {cut[s]['answers']}".rjust(col) for s in systems)
        )
    for s in systems:  # classification: per-class recall, entities: per-type F1 (the tuned system)
        per_class = report["systems"][s].get("per_class") if s == "tuned" else None
        if per_class:
            lines.append("per class (tuned): precision / recall / support")
            for label, c in list(per_class.items())[:30]:
                fmt = lambda v: "  n/a" if v is None else f"{v:5.1f}"  # noqa: E731
                lines.append(
                    f"  {label[: width - 2].ljust(width - 2)}  {fmt(c['precision'])} / {fmt(c['recall'])} / "
                    f"{c['support']}"
                )
            if len(per_class) > 30:
                lines.append(f"  ... {len(per_class) - 30} more classes in eval/metrics.json")
        per_type = report["systems"][s].get("per_type") if s == "tuned" else None
        if per_type:
            lines.append("per entity type (tuned): precision / recall / F1 / support")
            for name, c in per_type.items():
                lines.append(
                    f"  {name.ljust(width - 2)}  {c['precision']:5.1f} / {c['recall']:5.1f} / {c['f1']:5.1f} / "
                    f"{c['support']}"
                )
    if report.get("skipped_unseen_labels"):
        lines.append(
            f"warning: {report['skipped_unseen_labels']} test rows with labels training never saw were left out "
            "(eval/rejects.jsonl)"
        )
    for task, part in (report.get("tasks") or {}).items():
        lines += [
            "",
            f"task {task}: " + format_table({"test_examples": part["test_examples"], "systems": part["systems"]}),
        ]
    if report.get("task") == "domain":
        t = report["texts"]
        lines.append(
            f"domain: {t['domain']['documents']} held-out documents, {t['domain']['tokens']} tokens; "
            f"general: {t['general']['tokens']} tokens of {t['general']['source']}; chunks of {t['chunk_length']} "
            "tokens"
        )
    primary = primary_metric(report["systems"])
    for d in (report.get("intervals") or {}).get("differences", []):
        if primary is not None and d["metric"] == primary and (d["system"], d["baseline"]) in COMPARED_PAIRS:
            lines.append(difference_sentence(d, METRIC_LABELS[primary]))
    if report.get("forgetting"):
        f = report["forgetting"]
        lines.append(
            f"forgetting probe: {f['base_accuracy']:.1f}% -> {f['tuned_accuracy']:.1f}% ({f['questions']} questions)"
            + (" FLAGGED" if f["flagged"] else "")
        )
    return "\n".join(lines)
