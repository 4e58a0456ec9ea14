"""The advisor's parts of eval/report.html: the advice section first, intervals in the table, the risks."""

from __future__ import annotations

import html
from typing import Any

from afina.eval.advice import CURVE_PATH, advice, read_learning_curve
from afina.eval.learning_curve import learning_curve_chart
from afina.eval.summary import METRIC_LABELS
from afina.eval.uncertainty import interval_of
from afina.plots import img_tag
from afina.rundir import RunDir


def interval_text(report: dict[str, Any], system: str, metric: str) -> str:
    interval = interval_of(report, system, metric)
    return f' <span class="ci">[{interval[0]:.1f}, {interval[1]:.1f}]</span>' if interval else ""


def advice_section(run: RunDir, report: dict[str, Any]) -> str:
    """The four questions answered; the learning curve chart when `afina advise` has run."""
    curve = read_learning_curve(run.root)
    items = "".join(f"<dt>{html.escape(q)}</dt><dd>{html.escape(a)}</dd>" for q, a in advice(report, curve))
    chart = ""
    if curve:
        chart = img_tag(learning_curve_chart(curve, METRIC_LABELS.get(curve["metric"], curve["metric"])))
        chart += f"<p>From {html.escape(str(CURVE_PATH))} (`afina advise`).</p>"
    confidence = (report.get("intervals") or {}).get("confidence")
    note = (
        f"<p>Intervals in brackets are {100 * confidence:.0f}% bootstrap intervals over the test rows.</p>"
        if confidence
        else ""
    )
    return f"<h2>Advice</h2><dl>{items}</dl>{chart}{note}"


def risks_section(report: dict[str, Any]) -> str:
    """Differences with intervals, overfitting, invented facts and the bias probe, as measured."""
    parts = []
    differences = (report.get("intervals") or {}).get("differences", [])
    if differences:
        rows = "".join(
            f"<tr><td>{html.escape(d['system'])} - {html.escape(d['baseline'])}</td>"
            f"<td>{METRIC_LABELS.get(d['metric'], d['metric'])}</td>"
            f"<td>{d['difference']:+.2f}</td><td>[{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}]</td>"
            f"<td>{'yes' if d['conclusive'] else 'no: the test split is too small to tell these apart'}</td></tr>"
            for d in differences
        )
        parts.append(
            "<h2>Differences between systems</h2><table><tr><th>pair</th><th>metric</th><th>difference</th>"
            f"<th>interval</th><th>conclusive</th></tr>{rows}</table>"
        )
    overfitting = report.get("overfitting")
    if overfitting:
        curves, memorised = overfitting["curves"], overfitting.get("memorisation")
        lines = list(overfitting["advice"]) or ["Not flagged."]
        if curves.get("validations"):
            lines.append(
                f"Validation loss: best {curves['best_val_loss']:.3f} at step {curves['best_step']}, final "
                f"{curves['final_val_loss']:.3f}; final validation - train gap {curves['final_gap']}."
            )
        if memorised:
            lines.append(
                f"Tuned {memorised['metric']}: train rows {memorised['train']:.1f} ({memorised['train_rows']} rows), "
                f"test rows {memorised['test']:.1f}; gap {memorised['gap']:+.1f} [{memorised['interval'][0]:+.1f}, "
                f"{memorised['interval'][1]:+.1f}]."
            )
        flag = '<span class="flag">FLAGGED</span>' if overfitting["flagged"] else ""
        parts.append(
            f"<h2>Overfitting {flag}</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"
        )
    hallucination = report.get("hallucination")
    wrong = (hallucination or {}).get("wrong_passage")
    if wrong:
        rows = "".join(
            f"<tr><td>{html.escape(s)}</td><td>{e['assert_rate']:.1f} [{e['assert_interval'][0]:.1f}, "
            f"{e['assert_interval'][1]:.1f}]</td><td>{e['contains_reference']}</td></tr>"
            for s, e in wrong["systems"].items()
        )
        parts.append(
            f"<h2>Unanswerable questions under RAG</h2><p>{wrong['questions']} test questions given another "
            "question's passages (none containing the answer).</p><table><tr><th>system</th>"
            f"<th>asserts instead of abstaining (%)</th><th>answer right anyway</th></tr>{rows}</table>"
        )
    if hallucination and "systems" in hallucination:
        rows = "".join(
            f"<tr><td>{html.escape(s)}</td><td>{e.get('wrong_value_rate', 'n/a')}</td>"
            f"<td>{e.get('held_out_assert_rate', 'n/a')}</td>"
            f"<td>{html.escape(', '.join(f'{k} {v}' for k, v in e['counts'].items()))}</td></tr>"
            for s, e in hallucination["systems"].items()
        )
        parts.append(
            f"<h2>Invented facts</h2><p>{hallucination['rows_with_keys']} rows with known facts, "
            f"{hallucination['held_out_rows']} of them about facts absent from the train split.</p><table><tr>"
            "<th>system</th><th>wrong values (%)</th><th>asserts on held-out facts (%)</th><th>answers</th></tr>"
            f"{rows}</table>"
        )
    bias = report.get("bias")
    if bias:
        rows = "".join(
            f"<tr><td>{html.escape(d)}</td>"
            + "".join(
                f"<td>{e['systems'][s]['gap']:.3f} "
                f"[{e['systems'][s]['interval'][0]:.3f}, {e['systems'][s]['interval'][1]:.3f}]</td>"
                if s in e["systems"]
                else "<td>n/a</td>"
                for s in ("base", "tuned")
            )
            + f"<td>{'FLAGGED' if e['flagged'] else 'no'}</td></tr>"
            for d, e in bias["dimensions"].items()
        )
        parts.append(
            f"<h2>Bias probe</h2><p>{html.escape(bias['measure'])}; {bias['cases']} cases from {bias['inputs']} "
            f"test inputs; flagged when tuned - base exceeds {bias['threshold']} beyond its interval.</p>"
            f"<table><tr><th>swapped</th><th>base</th><th>tuned</th><th>flagged</th></tr>{rows}</table>"
        )
    return "".join(parts)
