"""`afina advise RECIPE`: how much data does this task need? A learning curve over nested subsets.

The recipe's prepared train split is shuffled once (seeded) and cut at 10/25/50/100%: each subset holds
the one before it, so the curve measures more data, not different data. Each subset trains with the
same settings and the same number of optimizer steps (subset_recipe says how), so the x-axis is data,
in <run>/advise/<pct>/ and is scored on the run's own test split; the full-data point reuses the
run's own evaluation when `afina eval` has run. A saturating power law through the points
(afina.eval.learning_curve) says what doubling the data is expected to buy; the base, few-shot and RAG
scores of the run's evaluation sit on the same chart.

    result = learning_curve(load_recipe("examples/rt_sentiment.yaml"))
    result["fit"]["doubling"]        # {"from_rows": ..., "gain": ..., "interval": [...]}

It writes <run>/advise/learning_curve.json and .png, and re-renders eval/report.html with the curve.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from typing import Any

from afina.config import Recipe
from afina.eval.learning_curve import doubling_sentence, fit_power_law, learning_curve_chart
from afina.eval.summary import LOWER_IS_BETTER, METRIC_LABELS, primary_metric
from afina.eval.uncertainty import interval_of
from afina.pipeline import evaluate, train
from afina.rundir import SPLITS, RunDir, read_jsonl, write_json_atomic, write_jsonl

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
BASELINES = ("base", "base_fewshot", "base_rag", "tuned_rag")
CURVE_FILE = "learning_curve.json"


def nested_subsets(
    rows: list[dict[str, Any]], fractions: tuple[float, ...], seed: int, label: str | None = None
) -> dict[float, list[dict[str, Any]]]:
    """{fraction: the first round(fraction * n) rows of one seeded shuffle}: each subset contains the smaller ones.

    With `label` (classification), one row of every class comes first, so that every subset can learn every
    class (a class without rows cannot be trained, and its test rows could not be scored).
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    floor = 1
    if label is not None:
        first: dict[Any, int] = {}
        for i in order:
            first.setdefault(rows[i].get(label), i)
        chosen = set(first.values())
        order = list(first.values()) + [i for i in order if i not in chosen]
        floor = len(first)
    return {f: [rows[i] for i in sorted(order[: max(floor, round(f * len(rows)))])] for f in fractions}


def subset_recipe(recipe: Recipe, fraction: float, folder: str) -> Recipe:
    """The recipe for one subset: its own run folder, the same number of optimizer steps as the full run, only the
    tuned model scored.

    The curve's x-axis is data: were a 10% subset trained for the same epochs, it would also get a tenth of the
    optimizer steps, and the curve would measure steps as much as rows. So `training.max_steps` is kept as it
    is, and `training.epochs` grows as the subset shrinks (epochs / fraction: as many steps over fewer rows). A
    recipe that trains until validation stops does so on every subset (each stops when its own validation does).
    """
    sub = recipe.model_copy(deep=True)
    sub.name = folder
    sub.output_dir = str(RunDir(recipe.run_dir).root / "advise")
    if not sub.training.max_steps and sub.training.epochs:
        sub.training.epochs = min(1000.0, sub.training.epochs / fraction)
    sub.eval.systems = ["tuned"]
    sub.eval.forgetting.enabled = False
    sub.eval.report = False
    sub.eval.risks.memorisation_rows = 0
    sub.eval.risks.bias = False
    return sub


def learning_curve(
    recipe: Recipe, fractions: tuple[float, ...] = FRACTIONS, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    run = RunDir(recipe.run_dir)
    train_rows = read_jsonl(run.require(run.split_path("train"), "prepare"))
    main_report = _read_report(run)
    points = []
    labelled = "label" if all("label" in row for row in train_rows) else None  # every class in every subset
    for fraction, subset in nested_subsets(train_rows, tuple(sorted(fractions)), recipe.seed, labelled).items():
        if fraction == 1.0 and main_report and "tuned" in main_report["systems"]:
            echo(f"advise: {len(subset)} rows (100%): the run's own evaluation")
            points.append(_point(fraction, len(subset), main_report, None))
            continue
        folder = f"{round(100 * fraction):03d}pct"
        sub = subset_recipe(recipe, fraction, folder)
        sub_run = RunDir(sub.run_dir)
        sub_run.data.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            if split != "train" and run.split_path(split).is_file():
                shutil.copyfile(run.split_path(split), sub_run.split_path(split))
        write_jsonl(sub_run.split_path("train"), subset)
        echo(f"advise: training on {len(subset)} of {len(train_rows)} rows ({100 * fraction:.0f}%) in {sub_run.root}")
        began = time.perf_counter()
        summary = train(sub, progress=False)
        seconds = time.perf_counter() - began
        points.append(_point(fraction, len(subset), evaluate(sub, progress=False), summary, seconds))
    metric = points[-1]["metric"]
    result: dict[str, Any] = {
        "metric": metric,
        "lower_is_better": metric in LOWER_IS_BETTER,
        "points": points,
        "baselines": {
            s: main_report["systems"][s][metric]
            for s in BASELINES
            if main_report and metric in main_report["systems"].get(s, {})
        },
    }
    fit_and_save(run, result, recipe.seed)
    _refresh_report(recipe, run, main_report)
    return result


def fit_and_save(run: RunDir, result: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fit the power law through result["points"] (the metric's best value bounds the ceiling: 100 for the
    percentages, 0 for losses), and write <run>/advise/learning_curve.json and .png. Also re-fits a saved curve:
    `fit_and_save(run, json.load(...), seed)`."""
    metric, points = result["metric"], result["points"]
    lower = metric in LOWER_IS_BETTER
    try:
        sigma = (
            [max((p["interval"][1] - p["interval"][0]) / 3.92, 1e-3) for p in points]
            if all(p.get("interval") for p in points)
            else None
        )
        result["fit"] = fit_power_law(
            [p["rows"] for p in points],
            [p["value"] for p in points],
            sigma,
            lower,
            seed=seed,
            best=0.0 if lower else 100.0,
        )
        result["advice"] = doubling_sentence(result["fit"], METRIC_LABELS.get(metric, metric), points)
    except (ValueError, RuntimeError) as exc:  # too few distinct sizes, or the fit did not converge
        result["fit"], result["advice"] = None, f"No power-law fit: {exc}."
    out = run.root / "advise"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CURVE_FILE, result)
    fig = learning_curve_chart(result, METRIC_LABELS.get(metric, metric))
    fig.savefig(out / "learning_curve.png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def _point(
    fraction: float, rows: int, report: dict[str, Any], summary: dict[str, Any] | None, seconds: float | None = None
) -> dict[str, Any]:
    metric = primary_metric({"tuned": report["systems"]["tuned"]}) or "answer_loss"
    return {
        "fraction": fraction,
        "rows": rows,
        "metric": metric,
        "value": report["systems"]["tuned"][metric],
        "interval": interval_of(report, "tuned", metric),
        "test_examples": report["test_examples"],
        "train_seconds": round(seconds, 1)
        if seconds is not None
        else (report.get("training") or {}).get("wall_time_s"),
        "steps": (summary or report.get("training") or {}).get("steps"),
    }


def _read_report(run: RunDir) -> dict[str, Any] | None:
    path = run.eval / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _refresh_report(recipe: Recipe, run: RunDir, report: dict[str, Any] | None) -> None:
    """eval/report.html again, now with the learning curve in its advice section."""
    predictions = run.eval / "predictions.jsonl"
    if report and recipe.eval.report and predictions.is_file():
        from afina.eval.report import write_report

        write_report(run, report, read_jsonl(predictions), recipe)


def format_learning_curve(result: dict[str, Any]) -> str:
    label = METRIC_LABELS.get(result["metric"], result["metric"])
    lines = [
        f"learning curve: {label} of the tuned model on the test split",
        f"{'train rows':>10}  {'value':>8}  interval",
    ]
    for p in result["points"]:
        interval = f"[{p['interval'][0]:.1f}, {p['interval'][1]:.1f}]" if p.get("interval") else ""
        lines.append(f"{p['rows']:>10}  {p['value']:8.2f}  {interval}")
    for system, value in result["baselines"].items():
        lines.append(f"{system:>10}  {value:8.2f}  (no fine-tuning)")
    lines.append(result["advice"])
    return "\n".join(lines)
