"""'None of these': out-of-scope detection for classification, and its precision and recall.

Two ways, chosen by `classification.out_of_scope` (see `oos_plan`):

    label      the data has a class meaning out of scope (e.g. `other`); it is learned like any class,
               and its precision and recall are the out-of-scope scores.
    threshold  no such class: a row whose top label probability is below a threshold is flagged out of
               scope. The threshold is calibrated on the validation split (in-scope rows only): the
               KEEP_IN_SCOPE quantile, so that that share of in-scope rows passes. Test rows whose label
               training never saw are the out-of-scope references.

    plan = oos_plan("auto", labels)                # OosPlan(kind="threshold", label=None)
    threshold = calibrate_threshold(validation_probabilities)
    scores = oos_scores(flagged, is_out_of_scope)  # precision, recall, in-scope rows flagged
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OOS_LABEL_NAMES = ("other", "out_of_scope", "out-of-scope", "oos", "none")
KEEP_IN_SCOPE = 0.95
THRESHOLD_FILE = "out_of_scope.json"  # <run>/out_of_scope.json: the calibrated threshold, for `afina predict`


@dataclass(frozen=True)
class OosPlan:
    kind: str  # "off", "label" or "threshold"
    label: str | None = None


def oos_plan(setting: str, labels: list[str]) -> OosPlan:
    """What `classification.out_of_scope` means for this label set."""
    if setting == "off":
        return OosPlan("off")
    if setting != "auto":
        if setting not in labels:
            raise ValueError(
                f"classification.out_of_scope={setting!r} names no label of the train split "
                f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}); name one, or use auto or off"
            )
        return OosPlan("label", setting)
    named = next((label for label in labels if label.lower() in OOS_LABEL_NAMES), None)
    return OosPlan("label", named) if named else OosPlan("threshold")


def calibrate_threshold(probabilities: list[float], keep: float = KEEP_IN_SCOPE) -> float:
    """The top-label probability below which a row is out of scope: `keep` of the in-scope rows are above it."""
    if not probabilities:
        raise ValueError("out-of-scope calibration needs validation rows; set data.split.validation above 0")
    return float(np.quantile(np.asarray(probabilities, dtype=float), 1.0 - keep))


def oos_scores(flagged: list[bool], out_of_scope: list[bool]) -> dict[str, float | int | None]:
    """Precision and recall (%) of the out-of-scope flag against the references, and the in-scope rows flagged."""
    tp = sum(f and o for f, o in zip(flagged, out_of_scope))
    fp = sum(f and not o for f, o in zip(flagged, out_of_scope))
    references = sum(out_of_scope)
    in_scope = len(flagged) - references
    return {
        "oos_precision": 100.0 * tp / (tp + fp) if tp + fp else None,
        "oos_recall": 100.0 * tp / references if references else None,
        "oos_references": references,
        "in_scope_flagged": 100.0 * fp / in_scope if in_scope else None,
    }
