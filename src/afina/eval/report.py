"""eval/report.html: one self-contained page (plots embedded as base64 PNGs) a person reads in a minute."""

from __future__ import annotations

import html
import json
from typing import Any

from afina.eval.generate import CUT_WARNING_SHARE
from afina.eval.html import CHECK_SCRIPT, STYLE
from afina.eval.long_context import long_context_section
from afina.eval.risks_html import advice_section, interval_text, risks_section
from afina.eval.summary import LOWER_IS_BETTER, METRIC_LABELS
from afina.plots import figure, img_tag
from afina.rundir import RunDir, read_jsonl, write_text_atomic


def metric_bars(report: dict[str, Any]) -> str:
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if all(isinstance(report["systems"][s].get(m), (int, float)) for s in systems)]
    parts = []
    for metric in metrics:
        fig, ax = figure(max(3.5, 1.1 * len(systems)), 2.6)
        values = [report["systems"][s][metric] for s in systems]
        ax.bar(systems, values, color="#4c72b0")
        ax.set_title(METRIC_LABELS[metric])
        ax.tick_params(axis="x", labelrotation=20)
        parts.append(img_tag(fig))
    speed = next(
        (
            k
            for k in ("generated_tokens_per_s", "examples_per_s")
            if report.get("efficiency") and all(k in report["efficiency"][s] for s in systems)
        ),
        None,
    )
    if speed:  # domain adaptation generates nothing
        fig, ax = figure(max(3.5, 1.1 * len(systems)), 2.6)
        ax.bar(systems, [report["efficiency"][s][speed] for s in systems], color="#dd8452")
        ax.set_title(speed.replace("_per_s", "/s").replace("_", " "))
        ax.tick_params(axis="x", labelrotation=20)
        parts.append(img_tag(fig))
    return "".join(parts)


def confusion_plots(report: dict[str, Any]) -> str:
    parts = []
    for system, scores in report["systems"].items():
        confusion = scores.get("confusion")
        if not confusion:
            continue
        labels, matrix = confusion["labels"], confusion["matrix"]
        size = min(12, 2 + 0.45 * len(labels))
        fig, ax = figure(size, size)
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(f"confusion matrix: {system}")
        if len(labels) <= 12:
            for r, row in enumerate(matrix):
                for c, value in enumerate(row):
                    ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
        parts.append(img_tag(fig))
    return "".join(parts)


def training_curves(run: RunDir) -> str:
    if not run.metrics.is_file():
        return "<p>No training metrics (metrics.jsonl) in this run.</p>"
    records = read_jsonl(run.metrics)
    if not records:
        return "<p>metrics.jsonl is empty.</p>"
    fig, ax = figure(6, 3)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    validated = [r for r in records if r.get("val_loss") is not None]
    if validated:
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.set_title("training curves")
    return img_tag(fig)


def worst_examples(predictions: list[dict[str, Any]], report: dict[str, Any], limit: int = 8) -> str:
    """The tuned system's worst answers by the per-example score that fits the task."""
    systems = list(report["systems"])
    system = "tuned" if "tuned" in systems else systems[-1]
    rows = [p for p in predictions if p["system"] == system]
    key = next((k for k in ("passed", "correct", "token_f1", "chrf") if any(k in p for p in rows)), None)
    if key is None:
        return "<p>No per-example score for this task.</p>"
    # Mixed data (several tasks; facts on some rows only): rank the rows that have the score.
    rows = sorted((p for p in rows if key in p), key=lambda p: float(p[key]))[:limit]
    cells = "".join(
        f"<tr><td>{html.escape(str(p['id']))}</td><td>{float(p[key]):.2f}</td>"
        + "".join(
            f'<td class="text"><pre>{html.escape(str(p[f])[:600])}</pre></td>'
            for f in ("question", "reference", "prediction")
        )
        + "</tr>"
        for p in rows
    )
    return (
        f"<p>System <b>{system}</b>, lowest <b>{key}</b> first.</p><table><tr><th>id</th><th>{key}</th>"
        f"<th>question</th><th>reference</th><th>prediction</th></tr>{cells}</table>"
    )


def systems_table(report: dict[str, Any]) -> str:
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if all(isinstance(report["systems"][s].get(m), (int, float)) for s in systems)]
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in systems) + "</tr>"
    body = ""
    for metric in metrics:
        values = [report["systems"][s][metric] for s in systems]
        best = min(values) if metric in LOWER_IS_BETTER else max(values)
        body += (
            f"<tr><td>{METRIC_LABELS[metric]}</td>"
            + "".join(
                f'<td class="{"best" if v == best else ""}">{v:.2f}{interval_text(report, s, metric)}</td>'
                for s, v in zip(systems, values)
            )
            + "</tr>"
        )
    efficiency_rows = (
        ("latency_p50_s", "latency p50 (s, per batch)"),
        ("latency_p95_s", "latency p95 (s, per batch)"),
        ("generated_tokens_per_s", "generated tokens/s"),
        ("examples_per_s", "examples/s"),
        ("peak_memory_mb", "peak memory (MiB)"),
        ("cost_per_1k_requests", "cost per 1,000 requests"),
    )
    for key, label in efficiency_rows if report.get("efficiency") else ():
        if not all(key in report["efficiency"][s] for s in systems):
            continue
        body += (
            f"<tr><td>{label}</td>" + "".join(f"<td>{report['efficiency'][s][key]:.4g}</td>" for s in systems) + "</tr>"
        )
    cut = (report.get("answer_length") or {}).get("cut") or {}
    if cut and all(s in cut for s in systems):
        body += f"<tr><td>answers cut at {report['answer_length']['max_new_tokens']} new tokens</td>" + "".join(
            f'<td class="{"warn" if cut[s]["share"] > CUT_WARNING_SHARE else ""}">{cut[s]["cut"]} of '
            f"{cut[s]['answers']}</td>"
            for s in systems
        )
        body += "</tr>"
    return f"<table>{head}{body}</table>"


def per_class_tables(report: dict[str, Any]) -> str:
    """Per-class precision/recall (classification) or per-type scores (entities) of each system."""
    parts = []
    for system, scores in report["systems"].items():
        table = scores.get("per_class") or scores.get("per_type")
        if not table:
            continue
        columns = [c for c in ("precision", "recall", "f1", "support") if c in next(iter(table.values()))]
        head = "<tr><th>class</th>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
        cell = lambda v: "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
        body = "".join(
            f"<tr><td>{html.escape(str(name))}</td>" + "".join(f"<td>{cell(row[c])}</td>" for c in columns) + "</tr>"
            for name, row in table.items()
        )
        parts.append(f"<h3>{html.escape(system)}</h3><table>{head}{body}</table>")
    return "".join(parts)


def long_context_html(run: RunDir) -> str:
    """The long-context section (passkey heat map, perplexity by position) when that evaluation ran."""
    path = run.eval / "long_context.json"
    if not path.is_file():
        return ""
    return "<h2>Long context</h2>" + long_context_section(json.loads(path.read_text(encoding="utf-8")))


def write_report(run: RunDir, report: dict[str, Any], predictions: list[dict[str, Any]], recipe) -> None:
    forgetting = report.get("forgetting")
    if forgetting:
        flag = '<span class="flag">FLAGGED</span>' if forgetting["flagged"] else "within threshold"
        forgetting_html = (
            f"<p>{forgetting['questions']} questions from {html.escape(forgetting['probe'])}: base "
            f"{forgetting['base_accuracy']:.1f}% &rarr; tuned {forgetting['tuned_accuracy']:.1f}% "
            f"(drop {forgetting['drop']:.1f} points, threshold {forgetting['threshold']}): {flag}.</p>"
        )
    else:
        forgetting_html = "<p>Not run (eval.forgetting.enabled is false or there is no tuned model).</p>"
    training = report.get("training") or {}
    task_tables = "".join(
        f"<h3>Task {html.escape(task)} ({part['test_examples']} examples)</h3>" + systems_table(part)
        for task, part in (report.get("tasks") or {}).items()
    )
    systems = report["systems"].values()
    class_sections = ""
    if any(s.get("per_class") or s.get("per_type") for s in systems):
        class_sections += "<h2>Per class</h2>" + per_class_tables(report)
    if any(s.get("confusion") for s in systems):
        class_sections += "<h2>Confusion matrices</h2>" + confusion_plots(report)
    raw = html.escape(json.dumps(report, indent=1)[:20000])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>afina eval: {html.escape(recipe.name)}</title>
<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>
<h1>afina eval: {html.escape(recipe.name)}</h1>
<p>Model {html.escape(recipe.model.name)}, method {recipe.method.type}; test split: {report["test_examples"]} examples;
metrics: {html.escape(", ".join(report["metrics"]))}.</p>
{advice_section(run, report)}
<h2>Recommendation</h2><ul>{"".join(f"<li>{html.escape(line)}</li>" for line in report["recommendation"])}</ul>
<h2>Systems &times; metrics</h2>{systems_table(report)}
{task_tables}
<p>Training: {training.get("wall_time_s")} s wall time, {training.get("steps")} steps, cost {training.get("cost")} at
price {recipe.eval.price_per_hour}/hour. Latency is each batch's wall time (batch size {recipe.eval.batch_size});
peak memory is the process's peak so far on CPU, the system's own peak on CUDA.</p>
<h2>Charts</h2>{metric_bars(report)}
{class_sections}
<h2>Training curves</h2>{training_curves(run)}
<h2>Forgetting probe</h2>{forgetting_html}
{risks_section(report)}
{long_context_html(run)}
<h2>Worst examples</h2>{worst_examples(predictions, report)}
<h2>Raw numbers</h2><details><summary>metrics.json</summary><pre>{raw}</pre></details>
</body></html>
"""
    write_text_atomic(run.eval / "report.html", page)
