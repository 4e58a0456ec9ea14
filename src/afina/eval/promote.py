"""`afina promote runs/NEW --over runs/CURRENT`: may a retrained model replace the one serving?

The gate, from what `afina eval` wrote for both runs (eval/metrics.json):

    same test      both were scored on the same frozen test split (its sha256 in the manifests, and the same
                   number of rows scored); retrain with data.test_path=runs/CURRENT/data/test.jsonl to keep it
    better         NEW's tuned model beats CURRENT's on the task's primary metric by more than --min-gain
    no forgetting  NEW's probe accuracy is at most the forgetting threshold (points) below CURRENT's

The decision, with the comparison, goes to NEW/promotion.json and is appended to CURRENT/promotions.jsonl;
when promoted and a serving file is named, that file is rewritten (atomically) to point at NEW, which a
server watching it can switch to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from afina.data.load import DataError
from afina.eval.summary import LOWER_IS_BETTER, METRIC_LABELS, primary_metric
from afina.rundir import RunDir, write_json_atomic


class PromotionError(DataError):
    """A run that cannot take part in the comparison (not evaluated); the message says what to run."""


def evaluation_of(run: RunDir) -> dict[str, Any]:
    path = run.eval / "metrics.json"
    if not path.is_file():
        raise PromotionError(f"{path} not found: run `afina eval` on {run.root} first")
    return json.loads(path.read_text(encoding="utf-8"))


def frozen_test(run: RunDir, evaluation: dict[str, Any]) -> tuple[str | None, int]:
    """(sha256, rows scored) of the test split the run's tuned model was scored on: the chat test file a preference
    run was evaluated on (preference.task_test), else the run's own prepared test split."""
    task_test = evaluation.get("task_test")
    if task_test:
        return task_test["sha256"], task_test["rows"]
    sha = ((run.read_manifest().get("data") or {}).get("splits_sha256") or {}).get("test")
    return sha, evaluation["test_examples"]


def promote(
    new: str | Path,
    current: str | Path,
    min_gain: float = 0.0,
    forgetting_threshold: float | None = None,
    serving: str | Path | None = None,
) -> dict[str, Any]:
    """Compare NEW with CURRENT, decide, record the decision (and point `serving` at NEW when promoted)."""
    new_run, current_run = RunDir(Path(new)), RunDir(Path(current))
    new_eval, current_eval = evaluation_of(new_run), evaluation_of(current_run)
    new_tuned, current_tuned = new_eval["systems"].get("tuned"), current_eval["systems"].get("tuned")
    if new_tuned is None or current_tuned is None:
        raise PromotionError("both runs need the 'tuned' system in eval.systems (eval/metrics.json)")
    if forgetting_threshold is None:
        recipe = current_run.read_manifest().get("recipe") or {}
        forgetting_threshold = float(((recipe.get("eval") or {}).get("forgetting") or {}).get("threshold", 5.0))
    reasons: list[str] = []

    (new_hash, new_rows), (current_hash, current_rows) = (
        frozen_test(new_run, new_eval),
        frozen_test(current_run, current_eval),
    )
    same_split = new_hash is not None and new_hash == current_hash
    if not same_split or new_rows != current_rows:
        reasons.append(
            f"not scored on the same frozen test split ({new_rows} vs {current_rows} rows, test sha256 "
            f"{'equal' if same_split else 'different'}): prepare NEW with data.test_path="
            f"{current_run.split_path('test')} (a preference run: preference.task_test=that file) and evaluate it again"
        )

    metric = primary_metric({"new": new_tuned, "current": current_tuned})
    comparison: dict[str, Any] = {}
    for name in METRIC_LABELS:
        if isinstance(new_tuned.get(name), (int, float)) and isinstance(current_tuned.get(name), (int, float)):
            comparison[name] = {
                "current": current_tuned[name],
                "new": new_tuned[name],
                "change": round(new_tuned[name] - current_tuned[name], 4),
            }
    gain = None
    if metric is None:
        reasons.append("the two evaluations share no quality metric")
    else:
        gain = comparison[metric]["change"] * (-1 if metric in LOWER_IS_BETTER else 1)
        if gain <= min_gain:
            reasons.append(
                f"{METRIC_LABELS[metric]} {current_tuned[metric]:.2f} -> {new_tuned[metric]:.2f}: "
                f"{'no better' if gain <= 0 else 'gains'} {gain:+.2f}, needs more than {min_gain:+.2f}"
            )

    probe = probe_comparison(new_eval.get("forgetting"), current_eval.get("forgetting"), forgetting_threshold)
    if probe["reason"]:
        reasons.append(probe["reason"])

    decision = {
        "promoted": not reasons,
        "new": str(new_run.root),
        "current": str(current_run.root),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "primary_metric": metric,
        "gain": gain,
        "min_gain": min_gain,
        "metrics": comparison,
        "forgetting": probe,
        "test_examples": new_rows,
        "reasons": reasons,
    }
    write_json_atomic(new_run.root / "promotion.json", decision)
    with (current_run.root / "promotions.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(decision) + "\n")
    if decision["promoted"] and serving is not None:
        point_serving_file(Path(serving), new_run, current_run)
        decision["serving"] = str(serving)
    return decision


def probe_comparison(new: dict[str, Any] | None, current: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """The forgetting probe of both tuned models: accuracy, the drop, and a refusal reason if the drop is too large."""
    if not new or not current:
        missing = "NEW" if not new else "CURRENT"
        return {
            "reason": f"{missing} has no forgetting probe result (eval.forgetting.enabled): evaluate it with the probe",
            "threshold": threshold,
        }
    if new["questions"] != current["questions"] or new.get("probe") != current.get("probe"):
        return {
            "reason": f"the runs used different forgetting probes ({current.get('probe')}, {current['questions']} "
            f"questions vs {new.get('probe')}, {new['questions']}): evaluate both with the same probe",
            "threshold": threshold,
        }
    drop = round(current["tuned_accuracy"] - new["tuned_accuracy"], 2)
    reason = None
    if drop > threshold:
        reason = (
            f"forgetting: probe accuracy {current['tuned_accuracy']:.1f} -> {new['tuned_accuracy']:.1f} "
            f"({drop:.1f} points lost, more than the {threshold} point threshold)"
        )
    return {
        "current": current["tuned_accuracy"],
        "new": new["tuned_accuracy"],
        "drop": drop,
        "threshold": threshold,
        "questions": new["questions"],
        "reason": reason,
    }


def point_serving_file(path: Path, new: RunDir, current: RunDir) -> None:
    """The serving file: which run's adapter to serve now (JSON, replaced atomically)."""
    write_json_atomic(
        path,
        {
            "run": str(new.root.resolve()),
            "adapter": str(new.adapter.resolve()),
            "replaces": str(current.root.resolve()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def format_promotion(decision: dict[str, Any]) -> str:
    lines = [f"{'metric':<34} {'current':>9} {'new':>9} {'change':>8}"]
    for name, c in decision["metrics"].items():
        mark = " *" if name == decision["primary_metric"] else ""
        lines.append(f"{METRIC_LABELS[name] + mark:<34} {c['current']:>9.2f} {c['new']:>9.2f} {c['change']:>+8.2f}")
    f = decision["forgetting"]
    if "current" in f:
        lines.append(
            f"{'forgetting probe accuracy (%)':<34} {f['current']:>9.1f} {f['new']:>9.1f} {-f['drop']:>+8.1f}"
            f"   (may lose at most {f['threshold']})"
        )
    lines.append(f"(* the deciding metric; {decision['test_examples']} test rows)")
    if decision["promoted"]:
        lines.append(
            f"PROMOTED: {decision['new']} replaces {decision['current']}"
            + (f"; {decision['serving']} now points at it" if decision.get("serving") else "")
        )
    else:
        lines.append(f"NOT PROMOTED: {decision['current']} stays. " + "; ".join(decision["reasons"]))
    return "\n".join(lines)
