"""data/report.html: the data report as one self-contained page (plots embedded as PNG)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from afina.plots import png_base64
from afina.rundir import write_text_atomic

SPLIT_COLOURS = {"train": "#4c72b0", "validation": "#dd8452", "test": "#55a868"}
MAX_LABELS_PLOTTED = 40


def plot_steps(report: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    names = [s["step"] for s in steps]
    ax.barh(names, [s["kept"] for s in steps], color="#4c72b0", label="kept")
    ax.barh(names, [s["rejected"] for s in steps], left=[s["kept"] for s in steps], color="#c44e52", label="rejected")
    for y, step in enumerate(steps):  # small reject counts are invisible as bars: print them
        if step["rejected"]:
            ax.text(step["rows_in"], y, f" -{step['rejected']}", va="center", fontsize=8, color="#c44e52")
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_xlim(0, steps[0]["rows_in"] * 1.12 + 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Rows through each step")
    return png_base64(fig)


def plot_token_lengths(report: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    hist = report["token_histogram"]
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 3))
    bottom = [0] * (len(edges) - 1)
    for name, counts in hist["counts"].items():
        ax.bar(
            edges[:-1],
            counts,
            width=[b - a for a, b in zip(edges[:-1], edges[1:])],
            align="edge",
            bottom=bottom,
            color=SPLIT_COLOURS[name],
            label=name,
            edgecolor="white",
            linewidth=0.3,
        )
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.axvline(report["truncation"]["max_length"], color="#c44e52", linestyle="--", label="max_length")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("rows")
    ax.legend()
    ax.set_title("Token lengths (kept rows)")
    return png_base64(fig)


def plot_labels(report: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    labels = report["labels"]
    totals: dict[str, int] = {}
    for counts in labels.values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + n
    order = sorted(totals, key=lambda label: -totals[label])[:MAX_LABELS_PLOTTED]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.22 * len(order) + 1)))
    left = [0] * len(order)
    for name, counts in labels.items():
        values = [counts.get(label, 0) for label in order]
        ax.barh(order, values, left=left, color=SPLIT_COLOURS[name], label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("rows")
    ax.legend()
    title = "Label distribution per split"
    if len(totals) > len(order):
        title += f" (the {len(order)} most frequent of {len(totals)})"
    ax.set_title(title)
    return png_base64(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>afina data report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "font-size:14px;vertical-align:top}th{background:#f3f3f3}pre{white-space:pre-wrap;font-size:12px;margin:0}"
        ".warn{color:#a33}</style></head><body>",
        "<h1>Data report</h1>",
        f"<p>Source: <code>{esc(report['source'])}</code><br>Schema: <b>{esc(str(report['schema']))}</b> "
        f"({'guessed' if report['schema_guessed'] else 'set in the recipe'}; {esc(report['field_mapping'])})<br>"
        f"Rows: {report['rows_in']} in, {report['kept']} kept, {report['rejected']} rejected "
        f"(rows in = kept + rejected)</p>",
    ]
    for warning in report["warnings"]:
        parts.append(f"<p class='warn'>Warning: {esc(warning)}</p>")
    parts.append("<h2>Steps</h2>")
    parts.append(
        _table(
            ["step", "rows in", "kept", "rejected", "reasons"],
            [
                [
                    s["step"],
                    s["rows_in"],
                    s["kept"],
                    s["rejected"],
                    "; ".join(f"{n} × {r}" for r, n in s["rejected_by_reason"].items()),
                ]
                for s in report["steps"]
            ],
        )
    )
    parts.append(f"<img src='data:image/png;base64,{plot_steps(report)}' alt='rows per step'>")
    parts.append("<h2>Splits</h2>")
    parts.append(
        _table(
            ["split", "rows", "tokens min", "mean", "p95", "max"],
            [
                [name, n, *(report["tokens_per_split"][name].get(k, "") for k in ("min", "mean", "p95", "max"))]
                for name, n in report["splits"].items()
            ],
        )
    )
    parts.append(
        f"<p>Method: {esc(report['split_method'])}. Leaks removed: {report['dedup']['leaks_removed']}. "
        f"Rows over max_length ({report['truncation']['max_length']} tokens): "
        f"{report['truncation']['rows_over_max_length']}, {esc(report['truncation']['action'])}.</p>"
    )
    if report["kept"]:
        parts.append(f"<img src='data:image/png;base64,{plot_token_lengths(report)}' alt='token lengths'>")
    if report.get("labels"):
        parts.append("<h2>Labels</h2>")
        parts.append(f"<img src='data:image/png;base64,{plot_labels(report)}' alt='label distribution'>")
    cleaning = report["cleaning"]
    parts.append("<h2>Cleaning</h2>")
    parts.append(
        _table(
            ["operation", "rows changed"], [[op, n] for op, n in cleaning["rows_changed"].items()] or [["(none)", 0]]
        )
    )
    if cleaning["pii_redaction"]:
        parts.append(
            _table(
                ["PII kind", "replaced"], [[k, n] for k, n in cleaning["pii_redacted"].items()] or [["(none found)", 0]]
            )
        )
    if report["reject_examples"]:
        parts.append("<h2>Examples of rejects</h2>")
        rows = [
            [reason, f"{ex['file']}:{ex['line']}", ex["reason"], ex["raw"][:300]]
            for reason, examples in report["reject_examples"].items()
            for ex in examples
        ]
        parts.append(_table(["kind", "where", "reason", "row"], rows))
    parts.append(
        "<details><summary>report.json</summary><pre>"
        f"{esc(json.dumps({k: v for k, v in report.items() if k != 'reject_examples'}, indent=1, ensure_ascii=False))}"
        "</pre></details></body></html>"
    )
    return "".join(parts)


def write_html_report(path: Path, report: dict[str, Any]) -> None:
    write_text_atomic(path, render_html(report))
