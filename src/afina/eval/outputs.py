"""What `afina eval` leaves in the run directory, the same for every task type."""

from __future__ import annotations

from typing import Any

from afina.config import Recipe
from afina.eval.report import write_report
from afina.rundir import RunDir, write_json_atomic, write_jsonl
from afina.train.trackers import report_eval


def write_eval(
    recipe: Recipe,
    run: RunDir,
    report: dict[str, Any],
    predictions: list[dict[str, Any]],
    rejects: list[dict[str, Any]] | None = None,
) -> None:
    """eval/metrics.json, eval/predictions.jsonl (eval/rejects.jsonl: test rows left out, with the reason),
    eval/report.html and the manifest's eval section."""
    write_jsonl(run.eval / "predictions.jsonl", predictions)
    if rejects is not None:
        write_jsonl(run.eval / "rejects.jsonl", rejects)
    write_json_atomic(run.eval / "metrics.json", report)
    if recipe.eval.report:
        write_report(run, report, predictions, recipe)
    run.update_manifest(eval=report)
    steps = (run.read_manifest().get("train") or {}).get("steps") or 0
    report_eval(recipe.training.report_to, run.root, recipe.model_dump(mode="json", by_alias=True), report, steps)
