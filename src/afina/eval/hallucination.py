"""Invented facts: how often an answer asserts a wrong value, and how often it asserts where it cannot know.

Both are read from the answers `afina eval` already generated, for rows with `must_include` keys:

- wrong value: the answer does not contain every key, but states a value of the same kind (a number,
  a time, an amount: any token with a digit) that no key contains. "Support opens at 9 a.m." for a key
  "7:40 a.m." is a wrong value; "I am not sure" is an abstention; "Please contact support" asserts no
  value (missing, not invented). Keys without digits cannot be checked this way and are not counted.
- unanswerable: test rows whose keys occur in no train row (held-out facts). Nothing in training told
  the model the answer, so an answer that states a value instead of abstaining is an invention (unless
  the value is right: the base model may know a real fact, and RAG may retrieve it).

Each share has a bootstrap interval and a paired base/tuned/RAG difference (afina.eval.uncertainty).
"""

from __future__ import annotations

import re
from typing import Any

from afina.eval.metrics import contains_all, normalize
from afina.eval.uncertainty import COMPARED_PAIRS, bootstrap_mean, paired_mean_difference

ABSTENTION = re.compile(
    r"\b(i (do not|don't|dont) know|not sure|i am unsure|i'm unsure|(cannot|can't|unable to|not able to) "
    r"(answer|say|tell|find|confirm|provide)|no information|(do not|don't) have (that|this|any|the) information|"
    r"not (mentioned|provided|stated|given|specified|available) in|i have no (idea|data|record))",
    re.IGNORECASE,
)
VALUE = re.compile(r"\d+(?:[.:,/]\d+)*")


def abstains(answer: str) -> bool:
    return bool(ABSTENTION.search(answer))


def values_in(text: str) -> set[str]:
    """Value tokens (anything with digits: 7:40, 12.5, 2024, 3) of a text."""
    return set(VALUE.findall(normalize(text)))


def classify_answer(answer: str, keys: list[str]) -> str:
    """correct / wrong_value / abstained / no_value, or unchecked when the keys hold no value (no digits) to compare:
    which rows are checked depends on the keys only, so every system is counted over the same rows."""
    key_values = set().union(*(values_in(k) for k in keys))
    if not key_values:
        return "unchecked"
    if contains_all(answer, keys):
        return "correct"
    if abstains(answer):
        return "abstained"
    return "wrong_value" if values_in(answer) - key_values else "no_value"


def held_out_ids(test_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> set[str]:
    """Test rows whose must_include keys occur in no train row's text: facts training never showed."""
    seen = normalize(" \n ".join(m["content"] for row in train_rows for m in row.get("messages", [])))
    return {
        str(row["id"])
        for row in test_rows
        if row.get("must_include") and not any(normalize(k) in seen for k in row["must_include"])
    }


def hallucination_report(
    test_rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    answers: dict[str, list[str]],
    resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any] | None:
    """Per system: the share of checked answers with a wrong value, and on held-out facts the share that assert
    (do not abstain); with intervals and paired differences. None when no row has must_include keys."""
    keyed = [(i, row) for i, row in enumerate(test_rows) if row.get("must_include")]
    if not keyed:
        return None
    held_out = held_out_ids(test_rows, train_rows)
    out: dict[str, Any] = {
        "rows_with_keys": len(keyed),
        "held_out_rows": len(held_out),
        "systems": {},
        "differences": [],
    }
    wrong: dict[str, list[float]] = {}
    asserted: dict[str, list[float]] = {}
    for system, system_answers in answers.items():
        kinds = [classify_answer(system_answers[i], row["must_include"]) for i, row in keyed]
        checked = [k for k in kinds if k != "unchecked"]
        wrong[system] = [100.0 * (k == "wrong_value") for k in checked]
        asserted[system] = [
            100.0 * (k not in ("abstained", "no_value"))
            for (i, row), k in zip(keyed, kinds, strict=False)
            if str(row["id"]) in held_out and k != "unchecked"
        ]
        entry: dict[str, Any] = {
            "counts": {
                kind: kinds.count(kind) for kind in ("correct", "wrong_value", "abstained", "no_value", "unchecked")
            }
        }
        if checked:
            interval = bootstrap_mean(wrong[system], resamples, confidence, seed)
            entry["wrong_value_rate"], entry["wrong_value_interval"] = round(interval.estimate, 2), interval.as_list()
        if asserted[system]:
            interval = bootstrap_mean(asserted[system], resamples, confidence, seed)
            entry["held_out_assert_rate"], entry["held_out_assert_interval"] = (
                round(interval.estimate, 2),
                interval.as_list(),
            )
        out["systems"][system] = entry
    for name, values in (("wrong_value_rate", wrong), ("held_out_assert_rate", asserted)):
        for a, b in COMPARED_PAIRS:
            if values.get(a) and values.get(b) and len(values[a]) == len(values[b]):
                diff = paired_mean_difference(values[a], values[b], resamples, confidence, seed)
                out["differences"].append(
                    {
                        "measure": name,
                        "system": a,
                        "baseline": b,
                        "difference": round(diff.estimate, 2),
                        "interval": diff.as_list(),
                        "conclusive": diff.excludes_zero,
                    }
                )
    return out


def wrong_passage_prompts(
    prompts: list[list[dict[str, str]]], rows: list[dict[str, Any]], questions: list[str], references: list[list[str]]
) -> tuple[list[int], list[list[dict[str, str]]]]:
    """Unanswerable questions under RAG: each question given the passages retrieved for the *next* row's question,
    left out where those passages happen to contain one of its reference answers. `prompts` are the RAG prompts of
    `rows` (each ends with its question); returns the rows kept and their prompts."""
    kept, out = [], []
    n = len(rows)
    for i in range(n):
        j = (i + 1) % n
        if j == i or questions[j] == questions[i]:
            continue
        other = next(m["content"] for m in reversed(prompts[j]) if m["role"] == "user")
        if not other.endswith(questions[j]):
            continue
        context = other[: len(other) - len(questions[j])]
        if any(normalize(ref) and normalize(ref) in normalize(context) for ref in references[i]):
            continue
        own = [dict(m) for m in prompts[i]]  # row i's own turns, its question after the other row's passages
        own[max(k for k, m in enumerate(own) if m["role"] == "user")]["content"] = context + questions[i]
        kept.append(i)
        out.append(own)
    return kept, out


def wrong_passage_report(
    answers: dict[str, list[str]], references: list[list[str]], resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Per RAG system: the share of answers to unanswerable questions (wrong passages) that assert instead of
    abstaining, and the share that still contain a reference answer (known without the passage)."""
    out: dict[str, Any] = {"questions": len(references), "systems": {}}
    for system, system_answers in answers.items():
        asserted = [100.0 * (not abstains(a)) for a in system_answers]
        interval = bootstrap_mean(asserted, resamples, confidence, seed)
        right = sum(
            any(normalize(r) in normalize(a) for r in refs if normalize(r))
            for a, refs in zip(system_answers, references, strict=True)
        )
        out["systems"][system] = {
            "assert_rate": round(interval.estimate, 2),
            "assert_interval": interval.as_list(),
            "contains_reference": right,
        }
    return out


def hallucination_sentences(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = []
    parts = [
        f"{s} {e['wrong_value_rate']:.1f}% [{e['wrong_value_interval'][0]:.1f}, {e['wrong_value_interval'][1]:.1f}]"
        for s, e in report.get("systems", {}).items()
        if "wrong_value_rate" in e
    ]
    if parts:
        lines.append("Wrong values (answers stating a value that is not the known fact's): " + "; ".join(parts) + ".")
    parts = [
        f"{s} {e['held_out_assert_rate']:.1f}%"
        for s, e in report.get("systems", {}).items()
        if "held_out_assert_rate" in e
    ]
    if parts:
        lines.append(
            f"On {report['held_out_rows']} questions about facts absent from training, answers that assert "
            "instead of abstaining: " + "; ".join(parts) + "."
        )
    wrong = report.get("wrong_passage")
    if wrong:
        parts = [
            f"{s} {e['assert_rate']:.1f}% [{e['assert_interval'][0]:.1f}, {e['assert_interval'][1]:.1f}]"
            for s, e in wrong["systems"].items()
        ]
        lines.append(
            f"Given a wrong passage ({wrong['questions']} questions whose answer is not in the context), "
            "answers that assert instead of abstaining: " + "; ".join(parts) + "."
        )
    for d in report.get("differences", []):
        if d["conclusive"] and d["difference"] > 0:
            lines.append(
                f"{d['system']} invents more than {d['baseline']} ({d['measure']} {d['difference']:+.1f} points, "
                f"interval [{d['interval'][0]:+.1f}, {d['interval'][1]:+.1f}])."
            )
    return lines
