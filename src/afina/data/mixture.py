"""Multi-task data: several datasets, each its own task, prepared apart and mixed for training.

Each source is prepared exactly as a single dataset would be (load, clean, dedup, split, leaks),
into <run>/tasks/<task>/data/. Then:

    train       the mixture of the tasks' train splits, by weights or by temperature sampling
    validation  every task's validation rows, whole
    test        every task's test rows, whole (evaluation reports metrics per task)

Every row keeps its task's name in a `task` field. `mix` is the one mixing function; replay in
sequential fine-tuning uses it too.

    mixed = mix({"qa": qa_rows, "summary": summary_rows}, weights={"qa": 1, "summary": 3}, total=1000, seed=0)
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from afina.config import Recipe, build_recipe
from afina.rundir import SPLITS, JsonlWriter, RunDir, file_sha256, read_jsonl, write_json_atomic, write_text_atomic

Row = TypeVar("Row")


def mixture_shares(
    sizes: dict[str, int], weights: dict[str, float] | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Each task's share of the mixture: by weights, or p_i proportional to n_i^(1/T).

    >>> mixture_shares({"a": 900, "b": 100}, temperature=2.0)
    {'a': 0.75, 'b': 0.25}
    """
    if weights is not None:
        missing = sorted(set(sizes) - set(weights))
        if missing:
            raise ValueError(f"no mixture weight for task(s) {', '.join(missing)}")
        raw = {task: float(weights[task]) for task in sizes}
        if any(w < 0 for w in raw.values()):
            raise ValueError(f"mixture weights must not be negative: {raw}")
    else:
        if temperature <= 0:
            raise ValueError(f"the mixture temperature must be positive, got {temperature}")
        raw = {task: n ** (1.0 / temperature) if n > 0 else 0.0 for task, n in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"nothing to mix: every task has weight 0 or no rows ({dict(sizes)})")
    return {task: w / total for task, w in raw.items()}


def mixture_counts(
    sizes: dict[str, int], weights: dict[str, float] | None = None, temperature: float = 1.0, total: int | None = None
) -> dict[str, int]:
    """Rows each task contributes to a mixture of `total` rows (default: all rows), rounded to add up to total."""
    shares = mixture_shares(sizes, weights, temperature)
    total = sum(sizes.values()) if total is None else total
    exact = {task: total * share for task, share in shares.items()}
    counts = {task: math.floor(value) for task, value in exact.items()}
    for task in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[: total - sum(counts.values())]:
        counts[task] += 1
    empty = [task for task, n in counts.items() if n > 0 and sizes[task] == 0]
    if empty:
        raise ValueError(f"task(s) {', '.join(empty)} have a share of the mixture but no rows")
    return counts


def draw(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    """`count` rows: a sample without replacement, or whole shuffled passes plus a sample when upsampling."""
    passes, rest = divmod(count, len(rows)) if rows else (0, 0)
    drawn: list[Row] = []
    for _ in range(passes):
        drawn += rng.sample(rows, len(rows))
    return drawn + rng.sample(rows, rest)


def mix(
    rows_by_task: dict[str, list[Row]],
    weights: dict[str, float] | None = None,
    temperature: float = 1.0,
    total: int | None = None,
    seed: int = 0,
) -> list[Row]:
    """A shuffled mixture of the tasks' rows, each task's count from its weight or from n_i^(1/T).

    Weights win over the temperature. A task asked for more rows than it has is upsampled (each row
    repeated as evenly as possible); fewer, and it is subsampled. Seeded: the same call gives the same list.
    """
    counts = mixture_counts({task: len(rows) for task, rows in rows_by_task.items()}, weights, temperature, total)
    rng = random.Random(seed)
    mixed = [row for task in rows_by_task for row in draw(rows_by_task[task], counts[task], rng)]
    rng.shuffle(mixed)
    return mixed


# ---- `afina prepare` with data.sources -----------------------------------------------------------


def task_recipe(recipe: Recipe, source) -> Recipe:
    """The recipe that prepares one source alone, into <run>/tasks/<task>/."""
    config = recipe.to_dict()
    data = config["data"]
    data.update(
        sources=[],
        path=str(recipe.resolve_path(source.path)),
        validation_path=str(recipe.resolve_path(source.validation_path)) if source.validation_path else None,
        test_path=str(recipe.resolve_path(source.test_path)) if source.test_path else None,
        format=source.format,
        text_unit=source.text_unit,
        schema=source.schema_,
        fields=source.fields,
        group_by=source.group_by or data["group_by"],
        system_prompt=source.system_prompt if source.system_prompt is not None else data["system_prompt"],
    )
    config.update(name=source.task, output_dir=str(recipe.run_dir / "tasks"))
    return build_recipe(config, f"data.sources[{source.task}]", recipe._base_dir)


def prepare_tasks(
    recipe: Recipe, strict: bool, prepare_one: Callable[[Recipe, bool], dict[str, Any]]
) -> dict[str, Any]:
    """Prepare each source as its own task (`prepare_one`: afina.data.prepare.prepare_data), then write the mixed
    train split and the per-task eval splits."""
    run = RunDir(recipe.run_dir)
    run.data.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict[str, Any]] = {}
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for source in recipe.data.sources:
        sub = task_recipe(recipe, source)
        reports[source.task] = prepare_one(sub, strict)
        sub_run = RunDir(sub.run_dir)
        splits[source.task] = {
            name: [{**row, "task": source.task} for row in read_jsonl(sub_run.split_path(name))] for name in SPLITS
        }

    weights = (
        {s.task: float(s.weight or 0.0) for s in recipe.data.sources}
        if recipe.data.sources[0].weight is not None
        else None
    )
    mixing = recipe.data.mixture
    train_by_task = {task: rows["train"] for task, rows in splits.items()}
    temperature = mixing.temperature or 1.0
    mixed = mix(train_by_task, weights, temperature, mixing.total, recipe.seed)
    realised = Counter(row["task"] for row in mixed)
    shares = mixture_shares({t: len(r) for t, r in train_by_task.items()}, weights, temperature)

    write_rows(run.split_path("train"), mixed)
    for name in ("validation", "test"):
        write_rows(run.split_path(name), [row for rows in splits.values() for row in rows[name]])
    write_rows(
        run.data / "rejects.jsonl",
        [
            {**r, "task": task}
            for task in splits
            for r in read_jsonl(run.root / "tasks" / task / "data" / "rejects.jsonl")
        ],
    )

    report = {
        "source": ", ".join(f"{s.task}: {s.path}" for s in recipe.data.sources),
        "schema": "multi-task",
        "tasks": {
            task: {
                "schema": r["schema"],
                "field_mapping": r["field_mapping"],
                "rows_in": r["rows_in"],
                "kept": r["kept"],
                "rejected": r["rejected"],
                "splits": r["splits"],
                "tokens": r["tokens"],
                "warnings": r["warnings"],
                "report": str(run.root / "tasks" / task / "data" / "report.json"),
            }
            for task, r in reports.items()
        },
        "mixture": {
            "method": "weights" if weights else f"temperature {temperature} (p_i ∝ n_i^(1/T))",
            "weights": weights,
            "temperature": None if weights else temperature,
            "train_rows_available": {task: len(rows) for task, rows in train_by_task.items()},
            "shares": {task: round(p, 4) for task, p in shares.items()},
            "train_rows_mixed": {task: realised[task] for task in splits},
            "total": len(mixed),
        },
        "rows_in": sum(r["rows_in"] for r in reports.values()),
        "rejected": sum(r["rejected"] for r in reports.values()),
        "splits": {
            "train": len(mixed),
            **{name: sum(len(rows[name]) for rows in splits.values()) for name in ("validation", "test")},
        },
        "warnings": [f"{task}: {w}" for task, r in reports.items() for w in r["warnings"]],
    }
    write_json_atomic(run.data / "report.json", report)
    write_text_atomic(run.data / "report.html", tasks_report_html(report))
    run.update_manifest(
        data={
            "source": report["source"],
            "schema": "multi-task",
            "tasks": {task: RunDir(run.root / "tasks" / task).read_manifest().get("data", {}) for task in splits},
            "mixture": report["mixture"],
            "splits_sha256": {name: file_sha256(run.split_path(name)) for name in SPLITS},
        }
    )
    return report


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    writer = JsonlWriter(path)
    for row in rows:
        writer.write(row)
    writer.close()


def format_tasks_report(report: dict[str, Any]) -> str:
    """The summary `afina prepare` prints for a multi-task recipe."""
    m = report["mixture"]
    lines = [f"multi-task data: {len(report['tasks'])} tasks, mixed by {m['method']}"]
    width = max(len(t) for t in report["tasks"])
    for task, r in report["tasks"].items():
        s = r["splits"]
        lines.append(
            f"  {task:<{width}}  {r['schema']}: {r['rows_in']} in, {r['kept']} kept, {r['rejected']} rejected; "
            f"splits train {s['train']}, validation {s['validation']}, test {s['test']}; "
            f"train mixture {m['train_rows_mixed'][task]} rows (share {m['shares'][task]:.3f})"
        )
    s = report["splits"]
    lines.append(
        f"splits: train {s['train']} (mixed), validation {s['validation']}, test {s['test']} (per task, whole)"
    )
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def tasks_report_html(report: dict[str, Any]) -> str:
    """data/report.html of a multi-task run: the mixture per task, with a link to each task's own data report."""
    import html

    m = report["mixture"]
    header = [
        "task",
        "schema",
        "rows in",
        "kept",
        "rejected",
        "train rows",
        "share",
        "train rows mixed",
        "validation",
        "test",
        "data report",
    ]
    body = ""
    for task, r in report["tasks"].items():
        cells = [
            task,
            r["schema"],
            r["rows_in"],
            r["kept"],
            r["rejected"],
            r["splits"]["train"],
            m["shares"][task],
            m["train_rows_mixed"][task],
            r["splits"]["validation"],
            r["splits"]["test"],
        ]
        link = f'<a href="../tasks/{html.escape(task)}/data/report.html">{html.escape(task)}</a>'
        body += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{link}</td></tr>"
    table = "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + f"</tr>{body}</table>"
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>afina data report (multi-task)</title></head><body>
<h1>Multi-task data</h1>
<p>{len(report["tasks"])} tasks, train split mixed by {html.escape(m["method"])}: {m["total"]} rows. Validation and test
rows stay whole, per task.</p>
{table}
<h2>Warnings</h2><ul>{warnings}</ul>
</body></html>
"""
