"""The studio's pages: server-rendered HTML (every value escaped), a little JavaScript in static/studio.js.

Each view reads what the stages wrote into the run directory; charts are drawn by studio.js from the
JSON embedded in `data-` attributes, so the live training curve and the static ones are one code.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from afina.data.schema import OPTIONAL_FIELDS, SCHEMAS
from afina.studio.forms import FORM, FormField, FormSection
from afina.studio.runs import STAGE_ORDER

RUN_VIEWS = {
    "prepare": "Prepare",
    "train": "Train",
    "eval": "Evaluate",
    "export": "Export",
    "chat": "Chat",
}


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def table(head: list[str], rows: list[list[Any]], caption: str = "", raw: bool = False) -> str:
    """A table; cells are escaped unless raw (cells already HTML)."""
    cells = (lambda v: str(v)) if raw else esc
    body = "".join("<tr>" + "".join(f"<td>{cells(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (
        f"<table>{cap}<thead><tr>{''.join(f'<th scope=col>{esc(h)}</th>' for h in head)}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def layout(title: str, body: str, view: str, run: str | None = None, active: str = "") -> str:
    tabs = ""
    if run is not None:
        links = [f"<a href='/new?run={esc(run)}'{_current(active == 'recipe')}>Recipe</a>"]
        links += [
            f"<a href='/runs/{esc(run)}/{key}'{_current(active == key)}>{label}</a>" for key, label in RUN_VIEWS.items()
        ]
        tabs = f"<nav class=tabs aria-label='run {esc(run)}'><strong>{esc(run)}</strong> {' '.join(links)}</nav>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · afina studio</title>
<link rel="stylesheet" href="/static/studio.css">
<link rel="icon" href="data:,">
</head>
<body data-view="{esc(view)}" data-run="{esc(run or "")}">
<a class=skip href="#main">Skip to content</a>
<header><nav aria-label="studio"><a class=brand href="/">afina studio</a> <a href="/"{_current(view == "runs")}>Runs</a>
<a href="/new"{_current(view == "new" and run is None)}>New run</a></nav>{tabs}</header>
<main id="main">
<h1>{esc(title)}</h1>
{body}
</main>
<script src="/static/studio.js"></script>
</body>
</html>"""


def _current(yes: bool) -> str:
    return " aria-current=page" if yes else ""


def stage_marks(stages: list[str]) -> str:
    return " ".join(
        f"<span class='stage {'done' if s in stages else 'todo'}' title='{s}: {'done' if s in stages else 'not yet'}'>"
        f"{'✓' if s in stages else '·'} {s}</span>"
        for s in STAGE_ORDER
    )


def runs_page(runs: list[dict[str, Any]], running: tuple[str, dict[str, Any]] | None) -> str:
    if not runs:
        body = "<p>No runs yet. <a href='/new'>Start a new run</a> from a data file.</p>"
        return layout("Runs", body, "runs")
    rows = []
    for r in runs:
        job = ""
        if running and running[0] == r["name"]:
            job = f"<span class=running>{esc(running[1]['stage'])} running</span>"
        metric = "—"
        if r.get("metric"):
            metric = f"{esc(r['metric'])}: {num(r.get('tuned'))} (base {num(r.get('base'))})"
        rows.append(
            [
                f"<a href='/runs/{esc(r['name'])}/{next_view(r)}'>{esc(r['name'])}</a>",
                stage_marks(r["stages"]),
                num(r.get("val_loss")),
                metric,
                seconds(r.get("wall_time_s")) if r["stages"] else "—",
                num(r.get("cost")),
                esc(r.get("finished_at") or ""),
                job,
            ]
        )
    names = [r["name"] for r in runs]
    options = "".join(f"<option>{esc(n)}</option>" for n in names)
    second = "".join(f"<option{' selected' if i == 1 else ''}>{esc(n)}</option>" for i, n in enumerate(names))
    body = table(
        ["run", "stages done", "validation loss", "headline metric (tuned)", "time", "cost", "last finished", "job"],
        rows,
        raw=True,
    ) + (
        "<form class=compare action='/compare' method=get><h2>Compare two runs</h2>"
        f"<label for=cmp-a>Run A</label> <select id=cmp-a name=a>{options}</select> "
        f"<label for=cmp-b>Run B</label> <select id=cmp-b name=b>{second}</select> "
        "<button type=submit>Compare</button></form>"
    )
    return layout("Runs", body, "runs")


def next_view(run: dict[str, Any]) -> str:
    done = run["stages"]
    if "export" in done:
        return "chat"
    if "eval" in done:
        return "export"
    if "train" in done:
        return "eval"
    if "prepare" in done:
        return "train"
    return "prepare"


def curve_series(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": f"{name} train loss", "points": [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None]},
        {
            "name": f"{name} validation loss",
            "points": [[r["step"], r["val_loss"]] for r in rows if r.get("val_loss") is not None],
        },
    ]


def chart(chart_id: str, label: str, series: list[dict[str, Any]]) -> str:
    data = esc(json.dumps(series))
    return (
        f"<figure><svg id='{chart_id}' class=chart role=img aria-label='{esc(label)}' data-series='{data}' "
        f"viewBox='0 0 640 260'></svg><figcaption>{esc(label)}</figcaption></figure>"
    )


def compare_page(a: dict[str, Any], b: dict[str, Any]) -> str:
    diff_rows = [[k, _short(va), _short(vb)] for k, va, vb in a["diff"]]
    body = f"<h2>Recipe differences ({len(diff_rows)})</h2>"
    body += table(["key", a["name"], b["name"]], diff_rows or [["(the recipes are the same)", "", ""]])
    keys = ["val_loss", "steps", "tokens_per_s", "wall_time_s", "cost"]
    rows = [[k, num(a["summary"].get(k)), num(b["summary"].get(k))] for k in keys]
    metrics = sorted(set(a["eval"]) | set(b["eval"]))
    rows += [[f"eval {m}", num(a["eval"].get(m)), num(b["eval"].get(m))] for m in metrics]
    body += "<h2>Metrics</h2>" + table(["metric", a["name"], b["name"]], rows)
    series = curve_series(a["name"], a["metrics"]) + curve_series(b["name"], b["metrics"])
    body += "<h2>Curves</h2>" + chart("compare-loss", "loss by step, both runs", series)
    return layout(f"{a['name']} vs {b['name']}", body, "compare")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "…"


def job_panel(run: str, job: dict[str, Any] | None, log: str) -> str:
    if job is None:
        state = "No job has run here from the studio yet."
    elif job["running"]:
        state = (
            f"<span class=running>{esc(job['stage'])} is running</span> "
            f"(pid {esc(job['pid'])}, since {esc(job['started_at'])})"
        )
    else:
        code = job.get("returncode")
        outcome = (
            "finished"
            if code == 0
            else "stopped (checkpoint saved; resume continues it)"
            if code == 130
            else f"ended with exit status {code}"
            if code is not None
            else "ended"
        )
        state = f"last job: {esc(job['stage'])} {esc(outcome)}"
    running = "true" if job and job["running"] else "false"
    return (
        f"<section class=job aria-labelledby=job-h><h2 id=job-h>Job</h2>"
        f"<p id=job-state role=status data-running='{running}'>{state}</p>"
        f"<details{' open' if job and job['running'] else ''}><summary>log</summary>"
        f"<pre id=job-log tabindex=0>{esc(log)}</pre></details>"
        f"<p id=job-error class=error role=alert></p></section>"
    )


def start_button(stage: str, label: str, extra: str = "") -> str:
    return f"<button type=button class=start data-stage='{stage}' {extra}>{esc(label)}</button>"


def prepare_page(run: str, report: dict[str, Any] | None, panel: str) -> str:
    body = (
        "<p>"
        + start_button("prepare", "Run prepare")
        + " reads the recipe's data, cleans, deduplicates and splits it.</p>"
    )
    body += panel
    if report is None:
        body += "<p>No data report yet: run prepare.</p>"
        return layout("Prepare", body, "prepare", run, "prepare")
    body += (
        f"<h2>Data report</h2><p>{esc(report['source'])}: schema <strong>{esc(report['schema'])}</strong>"
        f"{' (guessed)' if report.get('schema_guessed') else ''}, fields {esc(report.get('field_mapping'))}. "
        f"{report['rows_in']} rows in, <strong>{report['kept']} kept</strong>, {report['rejected']} rejected. "
        f"Splits: {', '.join(f'{esc(k)} {v}' for k, v in report['splits'].items())}.</p>"
    )
    body += table(
        ["step", "rows in", "kept", "rejected", "reasons"],
        [
            [
                s["step"],
                s["rows_in"],
                s["kept"],
                s["rejected"],
                ", ".join(f"{k}: {v}" for k, v in s["rejected_by_reason"].items()),
            ]
            for s in report["steps"]
        ],
        "rows per step",
    )
    examples = report.get("reject_examples") or {}
    if examples:
        rows = [
            [reason, f"{ex['file']}:{ex['line']}", ex["reason"], ex.get("raw", "")[:300]]
            for reason, items in examples.items()
            for ex in items
        ]
        body += "<h2>Rejects, with examples</h2>" + table(["kind", "where", "reason", "row"], rows)
    histogram = report.get("token_histogram") or {}
    if histogram.get("edges"):
        body += "<h2>Token lengths</h2>" + histogram_table(histogram)
    labels = report.get("labels")
    if labels:
        names = sorted({label for counts in labels.values() for label in counts})
        body += "<h2>Labels per split</h2>" + table(
            ["label", *labels], [[name, *(labels[s].get(name, 0) for s in labels)] for name in names]
        )
    for warning in report.get("warnings") or []:
        body += f"<p class=warning>{esc(warning)}</p>"
    body += f"<p><a href='/runs/{esc(run)}/file/data-report'>The full data report (with plots)</a></p>"
    return layout("Prepare", body, "prepare", run, "prepare")


def histogram_table(histogram: dict[str, Any]) -> str:
    edges, counts = histogram["edges"], histogram["counts"]
    peak = max((n for split in counts.values() for n in split), default=1) or 1
    rows = []
    for i in range(len(edges) - 1):
        bars = "".join(
            f"<span class='bar {esc(split)}' style='width:{100 * values[i] / peak:.0f}%' title='{esc(split)}'></span>"
            for split, values in counts.items()
        )
        numbers = ", ".join(f"{esc(split)} {values[i]}" for split, values in counts.items())
        rows.append([f"{edges[i]:.0f}–{edges[i + 1]:.0f}", numbers, f"<div class=bars>{bars}</div>"])
    return table(["tokens", "rows per split", ""], rows, "token-length histogram", raw=True)


def export_detail(item: dict[str, Any]) -> str:
    """The numbers behind one export's verdict: the measures (per reader for a GGUF file) and their limits."""

    def measures(check: dict[str, Any]) -> str:
        parts = [f"{k} {num(check[k])}" for k in ("kl_mean", "top1_agreement", "greedy_text_equal") if k in check]
        if "max_kl" in check:
            parts.append(f"max_kl {num(check['max_kl'])}")
        return ", ".join(parts)

    parts = [f"{item['size_mb']:g} MB"] if "size_mb" in item else []
    if measures(item):
        parts.append(measures(item))
    for reader in ("llama_cpp", "transformers"):
        check = item.get(reader)
        if isinstance(check, dict):
            said = measures(check) or check.get("skipped") or check.get("failed")
            parts.append(f"{reader.replace('_', '.')}: {said}")
    if "template_matches_chat_template" in item:
        parts.append(
            f"template {'matches' if item['template_matches_chat_template'] else 'DIFFERS from'} the chat template "
            f"({item.get('conversations_checked', 0)} conversations)"
        )
    if item.get("failed"):
        parts.append(f"failed: {item['failed']}")
    return "; ".join(parts)


def train_page(
    run: str,
    job_panel_html: str,
    has_checkpoint: bool,
    series: list,
    progress: dict[str, Any],
    result: str | None = None,
) -> str:
    resume = start_button("train", "Resume", "data-resume=true" + ("" if has_checkpoint else " disabled"))
    body = (
        "<p>"
        + start_button("train", "Start training")
        + " "
        + resume
        + " <button type=button id=stop>Stop (checkpoint and exit)</button></p>"
        + "<p><button type=button id=estimate data-time=true>Estimate memory and time</button> "
        "<span class=hint>from the prepared rows: loads the model and times a few steps (about a minute)</span></p>"
        "<pre id=estimate-result tabindex=0></pre>"
        + job_panel_html
        + (f"<p id=train-result role=status><strong>{esc(result)}</strong></p>" if result else "")
        + "<h2>Live</h2><dl class=live>"
        + "".join(
            f"<div><dt>{label}</dt><dd id='live-{key}'>—</dd></div>"
            for key, label in (
                ("step", "step"),
                ("loss", "loss"),
                ("val_loss", "validation loss"),
                ("lr", "learning rate"),
                ("tokens_per_s", "tokens/s"),
                ("memory", "peak memory (MB)"),
                ("eta", "time left"),
            )
        )
        + "</dl>"
        + chart("loss-chart", "train and validation loss by step", series)
        + chart("lr-chart", "learning rate by step", [])
        + "<p class=hint>Training runs in the background: closing this page does not stop it. "
        + (
            f"At most {esc(progress.get('total') or '?')} steps: training stops when validation loss stops "
            "improving (the recipe sets no epochs), keeping the best weights.</p>"
            if progress.get("at_most")
            else f"{esc(progress.get('total') or '?')} steps planned.</p>"
        )
    )
    return layout("Train", body, "train", run, "train")


def eval_page(run: str, metrics: dict[str, Any] | None, panel: str) -> str:
    body = "<p>" + start_button("eval", "Run evaluation") + " answers the test split with each system.</p>" + panel
    if metrics is None:
        body += "<p>No evaluation yet: train, then run evaluation.</p>"
        return layout("Evaluate", body, "eval", run, "eval")
    systems = metrics.get("systems") or {}
    names = sorted({m for scores in systems.values() for m in scores})
    body += "<h2>Systems × metrics</h2>" + table(
        ["metric", *systems], [[m, *(num(systems[s].get(m)) for s in systems)] for m in names]
    )
    if metrics.get("recommendation"):
        items = "".join(f"<li>{esc(line)}</li>" for line in metrics["recommendation"])
        body += f"<h2>Recommendation</h2><ul id=recommendation>{items}</ul>"
    forgetting = metrics.get("forgetting")
    if forgetting:
        body += (
            f"<h2>Forgetting</h2><p>{num(forgetting.get('base_accuracy'))}% → {num(forgetting.get('tuned_accuracy'))}%"
            f" on {esc(forgetting.get('questions'))} probe questions"
            f"{' — flagged' if forgetting.get('flagged') else ''}.</p>"
        )
    efficiency = metrics.get("efficiency") or {}
    if efficiency:
        cols = ["latency_p50_s", "generated_tokens_per_s", "peak_memory_mb", "cost_per_1k_requests"]
        body += "<h2>Cost</h2>" + table(
            ["system", *cols], [[s, *(num(e.get(c)) for c in cols)] for s, e in efficiency.items()]
        )
    body += (
        f"<h2>Full report</h2><p>Worst examples, intervals and plots: "
        f"<a href='/runs/{esc(run)}/file/eval-report'>open eval/report.html</a>.</p>"
        f"<iframe title='evaluation report' src='/runs/{esc(run)}/file/eval-report' class=report></iframe>"
    )
    return layout("Evaluate", body, "eval", run, "eval")


EXPORT_FORMATS = ("adapter", "merged", "gguf", "gguf_adapter", "ollama")


def export_page(run: str, chosen: list[str], exports: dict[str, Any] | None, panel: str, llama_cpp: str | None) -> str:
    boxes = "".join(
        f"<label><input type=checkbox name=format value='{f}'{' checked' if f in chosen else ''}> {f}</label> "
        for f in EXPORT_FORMATS
    )
    note = f"<p class=hint>GGUF needs llama.cpp: {esc(llama_cpp)}</p>" if llama_cpp else ""
    body = (
        f"<fieldset><legend>Formats</legend>{boxes}</fieldset>{note}<p>"
        + start_button("export", "Export")
        + " writes the chosen formats (saved into the recipe's export.formats) and verifies each.</p>"
        + panel
    )
    if exports:
        rows = []
        for name, item in exports.items():
            if not isinstance(item, dict):
                rows.append([name, "", esc(item), ""])
                continue
            ok = item.get("ok")
            verdict = "verified" if ok else ("skipped" if "skipped" in item else "NOT verified")
            detail = export_detail(item)
            rows.append(
                [name, esc(item.get("path", "")), f"<strong>{verdict}</strong>", esc(detail or item.get("skipped", ""))]
            )
        body += "<h2>Files and their verification</h2>" + table(["format", "path", "check", "details"], rows, raw=True)
    return layout("Export", body, "export", run, "export")


def chat_page(run: str, loaded: list[str] | None, logs: int) -> str:
    models = esc(json.dumps(loaded or []))
    body = (
        "<p><button type=button id=load-model>Load the base and tuned models</button> "
        f"<span id=chat-status role=status>{'loaded: ' + esc(', '.join(loaded)) if loaded else 'not loaded'}</span></p>"
        f"<div id=chat data-models='{models}'>"
        "<form id=chat-form><label for=chat-prompt>Message</label> "
        "<input id=chat-prompt autocomplete=off size=60> "
        "<label for=chat-max>max tokens</label> <input id=chat-max type=number min=1 value=32 style='width:5em'> "
        "<button type=submit id=chat-send>Send to both</button></form>"
        "<div class=columns><section aria-labelledby=col-base><h2 id=col-base>Base</h2>"
        "<div id=answers-base aria-live=polite></div></section>"
        "<section aria-labelledby=col-tuned><h2 id=col-tuned>Tuned</h2>"
        "<div id=answers-tuned aria-live=polite></div></section></div>"
        "</div>"
        f"<p><a href='/chat/{esc(run)}/'>Open the full chat page</a> (streams, one model at a time).</p>"
        "<h2>Next training file</h2>"
        "<p>Every answer is logged in the run's <code>logs/</code> "
        f"(<span id=logged-count>{logs}</span> requests so far); ratings and corrections go with them. "
        "<button type=button id=next-data>Build the next training file</button></p>"
        "<p id=next-result role=status></p>"
    )
    return layout("Chat", body, "chat", run, "chat")


def field_input(field: FormField, value: Any) -> str:
    fid = "f-" + field.key.replace(".", "-")
    shown = field.shown(value)
    # data-initial is the schema's default: the form sends what differs from it (the recipe keeps only those)
    attrs = (
        f"id='{fid}' name='{esc(field.key)}' data-key='{esc(field.key)}' "
        f"data-initial='{esc(field.shown(field.default))}' "
        f"aria-describedby='{fid}-help {fid}-err'"
    )
    if field.kind == "bool":
        control = f"<input type=checkbox {attrs}{' checked' if value else ''}>"
    elif field.kind == "choice":
        options = ([""] if field.optional else []) + list(field.choices)
        control = (
            f"<select {attrs}>"
            + "".join(f"<option{' selected' if o == shown else ''}>{esc(o)}</option>" for o in options)
            + "</select>"
        )
    else:
        kind = "text" if field.kind != "number" else "text' inputmode='decimal"
        control = f"<input type='{kind}' {attrs} value='{esc(shown)}'>"
    default = field.shown(field.default)
    return (
        f"<div class=field><label for='{fid}'>{esc(field.key.rsplit('.', 1)[-1])}</label>{control}"
        f"<small id='{fid}-help'>{esc(field.help)} <span class=default>default: {esc(default or 'none')}</span></small>"
        f"<p id='{fid}-err' class=error role=alert></p></div>"
    )


def form_section(section: FormSection, values: dict[str, Any], skip: set[str], top: bool = False) -> str:
    inner = "".join(field_input(f, values.get(f.key, f.default)) for f in section.fields if f.key not in skip)
    inner += "".join(form_section(s, values, skip) for s in section.sections)
    if top:
        return inner
    summary = f"{esc(section.key)}" + (
        f" — <span class=hint>{esc(section.help.strip())}</span>" if section.help else ""
    )
    return f"<details data-section='{esc(section.key)}'><summary>{summary}</summary>{inner}</details>"


def new_run_page(
    files: list[dict[str, Any]], values: dict[str, Any], data_path: str, run: str | None, limit: int
) -> str:
    picks = "".join(
        f"<option value='{esc(f['path'])}'{' selected' if f['path'] == data_path else ''}>{esc(f['path'])} "
        f"({f['size']:,} bytes)</option>"
        for f in files
    )
    schemas = "".join(f"<option>{esc(s)}</option>" for s in ["auto", *SCHEMAS])
    canon = {name: [*fields, *OPTIONAL_FIELDS.get(name, {})] for name, fields in SCHEMAS.items()}
    skip = {"name", "output_dir", "data.path", "data.schema", "data.fields"}
    fields = values.get("data.fields") or {}
    body = f"""
<section aria-labelledby=data-h><h2 id=data-h>1. Data</h2>
<p><label for=upload>Upload a data file</label> <input type=file id=upload
 accept=".jsonl,.json,.csv,.tsv,.parquet,.txt,.md"> <button type=button id=upload-send>Upload</button>
 <span class=hint>(up to {limit // (1 << 20)} MiB)</span></p>
<p><label for=data-path>or pick a file</label>
 <select id=data-path><option value=''>(choose)</option>{picks}</select></p>
<p id=data-error class=error role=alert></p>
</section>
<section aria-labelledby=schema-h data-canonical='{esc(json.dumps(canon))}'>
<h2 id=schema-h>2. Schema and field mapping</h2>
<p><label for=schema>schema</label>
 <select id=schema data-initial='{esc(values.get("data.schema", "auto"))}'>{schemas}</select>
 <span class=hint>auto: guessed from the fields</span></p>
<div id=mapping data-fields='{esc(json.dumps(fields))}'></div>
<p><button type=button id=check-schema>Check the mapping</button></p>
<p id=schema-result role=status></p>
<pre id=schema-preview tabindex=0></pre>
</section>
<section aria-labelledby=recipe-h><h2 id=recipe-h>3. Recipe</h2>
<form id=recipe-form data-edit='{esc(run or "")}' novalidate>
<p id=form-error class=error role=alert></p>
<div class=field><label for=f-name>run name</label><input id=f-name data-key=name value='{esc(values.get("name", ""))}'
 {"readonly" if run else ""} aria-describedby="f-name-help f-name-err" required>
<small id=f-name-help>The run's folder under the runs directory (letters, digits, _ . -).</small>
<p id=f-name-err class=error role=alert></p></div>
<p id=f-data-path-err class=error role=alert></p>
{form_section(FORM, values, skip, top=True)}
<p><button type=submit id=save-recipe>Save recipe</button>
 <button type=button id=estimate>Estimate memory</button>
 <button type=button id=save-prepare>Save and prepare</button></p>
</form>
<p id=save-result role=status></p>
<pre id=estimate-result tabindex=0></pre>
<p class=hint>Memory from the model's configuration and the longest allowed row (nothing is loaded). After
Prepare, the Train page estimates memory from the real rows and times a few steps.</p>
<details><summary>recipe.yaml</summary><pre id=recipe-yaml tabindex=0></pre></details>
</section>"""
    return layout("New run" if run is None else f"Recipe of {run}", body, "new", run, "recipe")


def message_page(title: str, message: str, status: int) -> str:
    return layout(title, f"<p class=error role=alert>{esc(message)}</p><p>HTTP {status}</p>", "error")


def login_page(error: str = "") -> str:
    body = (
        "<form method=post action='/login'><p><label for=key>API key</label> "
        "<input id=key name=key type=password autocomplete=current-password> <button type=submit>Enter</button></p>"
        f"<p class=error role=alert>{esc(error)}</p></form>"
    )
    return layout("Sign in", body, "login")
