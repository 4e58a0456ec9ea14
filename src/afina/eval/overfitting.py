"""Overfitting, from what training logged and what the tuned model answers.

Two signs, each with the setting that addresses it:

- the loss curves (metrics.jsonl): the gap between validation and train loss at each validation, and
  the step where validation loss turned (its minimum, when it then rose by more than `tolerance`);
- memorisation: the tuned model's score on a sample of train rows against its score on the test rows,
  with a bootstrap interval of the gap (the two samples are independent rows, so the difference is
  unpaired).

    diagnosis = loss_curve_diagnosis(read_jsonl(run.metrics))
    diagnosis["turned_at_step"], diagnosis["flagged"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afina.eval.uncertainty import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Interval,
    percentile_interval,
    resample_indices,
)

TURN_TOLERANCE = 0.05  # validation loss 5% above its minimum by the end: it turned, not noise
MEMORISATION_POINTS = 15.0  # train score this many points above test (and the interval above 0): memorised


def loss_curve_diagnosis(records: list[dict[str, Any]], tolerance: float = TURN_TOLERANCE) -> dict[str, Any]:
    """Train/validation gap over time and the step where validation loss turned (None: it did not)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    validated = [(r["step"], r.get("epoch"), r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not validated:
        return {
            "validations": 0,
            "flagged": False,
            "gap": [],
            "turned_at_step": None,
            "note": "no validation loss was logged (empty validation split?): "
            "overfitting cannot be read from the curves",
        }
    gap, previous = [], 0
    for step, epoch, val in validated:
        window = [loss for s, loss in train if previous < s <= step] or [loss for s, loss in train if s <= step][-1:]
        train_loss = float(np.mean(window)) if window else None
        gap.append(
            {
                "step": step,
                "epoch": epoch,
                "train_loss": _round(train_loss),
                "val_loss": round(val, 5),
                "gap": _round(val - train_loss if train_loss is not None else None),
            }
        )
        previous = step
    best = min(range(len(validated)), key=lambda i: validated[i][2])
    best_step, best_epoch, best_val = validated[best]
    final_val = validated[-1][2]
    rise = (final_val - best_val) / max(abs(best_val), 1e-9)
    turned = best < len(validated) - 1 and rise > tolerance
    return {
        "validations": len(validated),
        "gap": gap,
        "best_step": best_step,
        "best_epoch": best_epoch,
        "best_val_loss": round(best_val, 5),
        "final_val_loss": round(final_val, 5),
        "rise": round(rise, 4),
        "turned_at_step": best_step if turned else None,
        "final_gap": gap[-1]["gap"],
        "flagged": bool(turned),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def unpaired_mean_difference(
    a: list[float],
    b: list[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) for two independent samples, each resampled on its own."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not x.size or not y.size:
        raise ValueError("an unpaired difference needs values on both sides")
    diffs = x[resample_indices(x.size, resamples, seed)].mean(1) - y[
        resample_indices(y.size, resamples, seed + 1)
    ].mean(1)
    return Interval(float(x.mean() - y.mean()), *percentile_interval(diffs, confidence))


def memorisation_gap(
    metric: str,
    train_values: list[float],
    test_values: list[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    threshold: float = MEMORISATION_POINTS,
) -> dict[str, Any]:
    """The tuned model's train-minus-test score (higher-is-better metric in points) and whether it is flagged."""
    diff = unpaired_mean_difference(train_values, test_values, resamples, confidence, seed)
    return {
        "metric": metric,
        "train": round(float(np.mean(train_values)), 2),
        "test": round(float(np.mean(test_values)), 2),
        "gap": round(diff.estimate, 2),
        "interval": diff.as_list(),
        "train_rows": len(train_values),
        "test_rows": len(test_values),
        "threshold": threshold,
        "flagged": bool(diff.estimate > threshold and diff.low > 0),
    }


def overfitting_report(
    records: list[dict[str, Any]], training: dict[str, Any], recipe, memorisation: dict[str, Any] | None
) -> dict[str, Any]:
    """Both signs and the settings to change (eval/metrics.json `overfitting`)."""
    curves = loss_curve_diagnosis(records)
    flagged = curves["flagged"] or bool(memorisation and memorisation["flagged"])
    return {
        "curves": curves,
        "memorisation": memorisation,
        "flagged": flagged,
        "advice": overfitting_advice(curves, memorisation, training, recipe) if flagged else [],
    }


def overfitting_advice(
    curves: dict[str, Any], memorisation: dict[str, Any] | None, training: dict[str, Any], recipe
) -> list[str]:
    """Plain sentences: what was seen and which recipe settings to change."""
    lines = []
    cfg = recipe.training
    if curves.get("turned_at_step") is not None:
        epoch = curves.get("best_epoch")
        epochs = f"training.epochs={max(1, int(np.ceil(epoch)))}" if epoch else "fewer training.epochs"
        lines.append(
            f"Validation loss was lowest at step {curves['best_step']} ({curves['best_val_loss']:.3f}) and rose "
            f"{100 * curves['rise']:.0f}% by the end ({curves['final_val_loss']:.3f}): set {epochs} or "
            f"training.early_stopping_patience=1, or lower training.learning_rate (now {cfg.learning_rate:g})."
        )
        if cfg.load_best_at_end:
            lines.append(
                f"The saved weights are those of step {curves['best_step']} (training.load_best_at_end); "
                "the steps after it cost time without improving the model."
            )
    if memorisation and memorisation["flagged"]:
        rank = (
            f"a smaller method.r (now {recipe.method.r})"
            if recipe.method.type != "full"
            else "LoRA instead of full fine-tuning"
        )
        lines.append(
            f"Memorisation: the tuned model scores {memorisation['train']:.1f} on train rows but "
            f"{memorisation['test']:.1f} on test rows ({memorisation['metric']}, gap {memorisation['gap']:+.1f} "
            f"[{memorisation['interval'][0]:+.1f}, "
            f"{memorisation['interval'][1]:+.1f}]): more varied train data (paraphrases, more rows), fewer epochs, "
            f"or {rank}."
        )
    return lines
