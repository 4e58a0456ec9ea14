"""Tool-calling metrics: did the model call when it should, the right tool, with the right arguments?

Each test row's last assistant turn is the reference: tool calls, or a plain answer. A prediction is read back
with `calls_in_text` (<tool_call> blocks). Per row:

    call_decision       1 when the prediction calls a tool exactly when the reference does (call or answer)
    tool_name_accuracy  rows with reference calls: the predicted tool names equal the reference's, as a multiset
    argument_match      rows with reference calls: the share of the reference calls' arguments whose value the
                        prediction gives for the same tool (calls matched as a set, each used once)
    call_exact_match    rows with reference calls: the predicted calls equal the reference calls as a set
                        (name and every argument)
    json_validity       rows where the prediction tries a call: every <tool_call> block is a JSON call with an
                        object of arguments

Values compare by type and value: 1 and 1.0 are equal, "1" and 1 are not, true is not 1; objects ignore key
order; lists keep theirs. Parallel calls are matched as a set (order-insensitive).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from afina.data.tools import calls_in_text

# metric -> the per-row field of eval/predictions.jsonl (0/1 or a share), scaled to % (see eval/uncertainty.py)
TOOL_METRICS = {
    "call_decision": "decision_correct",
    "tool_name_accuracy": "names_correct",
    "argument_match": "argument_match",
    "call_exact_match": "call_exact",
    "json_validity": "json_valid",
}


def canonical_value(value: Any) -> Any:
    """A hashable form in which equal values by type and value are equal (1 == 1.0, true != 1, keys unordered)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, dict):
        return ("object", frozenset((k, canonical_value(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(canonical_value(v) for v in value))
    return ("other", repr(value))


def reference_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The reference turn's calls as {name, arguments (an object)}."""
    return [
        {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
        for c in message.get("tool_calls", ())
    ]


def _call_key(call: dict[str, Any]) -> Any:
    return (call["name"], canonical_value(call["arguments"]))


def _argument_hits(reference: list[dict[str, Any]], predicted: list[dict[str, Any]]) -> tuple[int, int]:
    """(matching argument values, reference arguments): each reference call paired with the unused predicted call of
    the same tool that shares most argument values."""
    unused = list(predicted)
    hits = total = 0
    for ref in reference:
        wanted = {k: canonical_value(v) for k, v in ref["arguments"].items()}
        total += max(len(wanted), 1)
        same_tool = [p for p in unused if p["name"] == ref["name"]]
        if not same_tool:
            continue

        def shared(p: dict[str, Any], wanted: dict[str, Any] = wanted) -> int:
            return sum(canonical_value(p["arguments"].get(k, object())) == v for k, v in wanted.items())

        best = max(same_tool, key=shared)
        unused.remove(best)
        hits += shared(best) if wanted else int(not best["arguments"])
    return hits, total


def score_tool_answer(reference: dict[str, Any], prediction: str) -> dict[str, float | None]:
    """The per-row fields (see TOOL_METRICS) of one prediction against its reference assistant turn."""
    ref_calls = reference_calls(reference)
    _, read = calls_in_text(prediction)
    predicted = [c for c in read if c is not None]
    scores: dict[str, float | None] = {
        "decision_correct": float(bool(ref_calls) == bool(read)),
        "json_valid": float(all(c is not None for c in read)) if read else None,
        "names_correct": None,
        "argument_match": None,
        "call_exact": None,
    }
    if ref_calls:
        names = sorted(c["name"] for c in predicted)
        scores["names_correct"] = float(names == sorted(c["name"] for c in ref_calls) and len(read) == len(predicted))
        hits, total = _argument_hits(ref_calls, predicted)
        scores["argument_match"] = hits / total
        same = Counter(map(_call_key, predicted)) == Counter(map(_call_key, ref_calls))  # a multiset: order-free
        scores["call_exact"] = float(same and len(read) == len(predicted))
    return scores


def tool_metric_means(per_row: list[dict[str, float | None]]) -> dict[str, float]:
    """Each metric in % over the rows it applies to (a metric no row applies to is left out)."""
    out = {}
    for metric, field in TOOL_METRICS.items():
        values = [row[field] for row in per_row if row.get(field) is not None]
        if values:
            out[metric] = round(100.0 * sum(values) / len(values), 2)  # type: ignore[arg-type]
    return out
