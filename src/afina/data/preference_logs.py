"""`afina data from-logs LOGS --pairs`: preference data from what users said about served answers.

What each kind of feedback gives (the latest feedback for a response id wins):

    a correction                          a pair: the correction preferred over the model's answer
    two answers to the same prompt,       a pair: the better-rated answer preferred over the other
      rated differently
    a rating of at least min_rating       a KTO 'good' example (the answer, desirable)
    a rating of at most max_bad_rating    a KTO 'bad' example (the answer, undesirable)

Corrections also give KTO examples (the correction good, the model's answer bad). Pairs go to the
output file ({prompt, chosen, rejected}); KTO examples to a second file ({prompt, completion,
label}), since `afina prepare` reads one row shape per file. Both are what `task: preference`
prepares as they are.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

from afina.data.load import DataError, iter_json_objects
from afina.rundir import write_jsonl

LOG_FILES = ("requests.jsonl", "feedback.jsonl")


def read_log(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a request or feedback log; none when the file is absent."""
    if not path.is_file():
        return []
    rows = []
    for number, row in iter_json_objects(path):
        if "id" not in row:
            raise DataError(f"{path}:{number}: a log line must be an object with an 'id'")
        rows.append((number, row))
    return rows


def request_prompt(request: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation a logged request asked to continue (a raw completion: one user turn)."""
    if "messages" in request:
        return [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
    if "prompt" in request:
        return [{"role": "user", "content": request["prompt"]}]
    raise DataError(f"{where}: a request line needs 'messages' or 'prompt'")


def logs_to_preferences(
    log_dir: str | Path, min_rating: int = 1, max_bad_rating: int = -1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(pairs, KTO examples, counts of each kind and of what was left out) from a server's log folder."""
    log_dir = Path(log_dir)
    requests_path = log_dir / "requests.jsonl"
    if not requests_path.is_file():
        raise DataError(f"{requests_path} not found: start `afina serve` with --log-dir {log_dir} to write it")
    feedback = {row["id"]: row for _, row in read_log(log_dir / "feedback.jsonl")}
    counts: Counter[str] = Counter()
    pairs: list[dict[str, Any]] = []
    kto: list[dict[str, Any]] = []
    rated: dict[str, list[tuple[int, str, str, list]]] = defaultdict(list)  # prompt -> (rating, answer, id, prompt)
    kto_seen: set[tuple[str, str, bool]] = set()
    for number, request in read_log(requests_path):
        counts["requests"] += 1
        if request.get("aborted"):  # cut off when the client went away: not the model's whole answer
            counts["left_out_aborted"] += 1
            continue
        note = feedback.get(request["id"])
        if note is None:
            counts["left_out_unrated"] += 1
            continue
        answer = (request.get("answer") or "").strip()
        prompt = request_prompt(request, f"{requests_path}:{number}")
        source = {"id": request["id"], "model": request.get("model")}
        correction = (note.get("correction") or "").strip()
        rating = note.get("rating")
        if not answer:
            counts["left_out_empty_answer"] += 1
            continue
        if correction and correction != answer:
            pairs.append(
                {"prompt": prompt, "chosen": correction, "rejected": answer, "source": {**source, "kind": "correction"}}
            )
            kto.append(
                {"prompt": prompt, "completion": correction, "label": True, "source": {**source, "kind": "correction"}}
            )
            kto.append(
                {
                    "prompt": prompt,
                    "completion": answer,
                    "label": False,
                    "source": {**source, "kind": "corrected_answer"},
                }
            )
            counts["pairs_from_corrections"] += 1
            counts["kto_good"] += 1
            counts["kto_bad"] += 1
        if rating is None:
            if not correction or correction == answer:
                counts["left_out_no_rating"] += 1
            continue
        rated[json.dumps(prompt, sort_keys=True)].append((rating, answer, request["id"], prompt))
        if correction and correction != answer:  # its KTO examples came from the correction
            continue
        if min_rating > rating > max_bad_rating:
            counts["neutral_rating"] += 1
            continue
        good = rating >= min_rating
        key = (json.dumps(prompt, sort_keys=True), answer, good)
        if key in kto_seen:  # the same answer to the same prompt, rated the same way again
            counts["repeated_rating"] += 1
            continue
        kto_seen.add(key)
        kto.append(
            {
                "prompt": prompt,
                "completion": answer,
                "label": good,
                "source": {**source, "kind": "rated_good" if good else "rated_bad"},
            }
        )
        counts["kto_good" if good else "kto_bad"] += 1
    for answers in rated.values():
        seen: set[tuple[str, str]] = set()
        for a, b in combinations(sorted(answers, key=lambda x: -x[0]), 2):
            if a[0] == b[0] or a[1] == b[1] or (a[1], b[1]) in seen:
                continue
            seen.add((a[1], b[1]))
            pairs.append(
                {
                    "prompt": a[3],
                    "chosen": a[1],
                    "rejected": b[1],
                    "source": {"ids": [a[2], b[2]], "ratings": [a[0], b[0]], "kind": "ratings"},
                }
            )
            counts["pairs_from_ratings"] += 1
    return (
        pairs,
        kto,
        {
            key: counts[key]
            for key in (
                "requests",
                "pairs_from_corrections",
                "pairs_from_ratings",
                "kto_good",
                "kto_bad",
                "neutral_rating",
                "repeated_rating",
                "left_out_unrated",
                "left_out_no_rating",
                "left_out_empty_answer",
                "left_out_aborted",
            )
        },
    )


def preferences_from_logs(
    log_dir: str | Path,
    output: str | Path,
    kto_output: str | Path | None = None,
    min_rating: int = 1,
    max_bad_rating: int = -1,
) -> dict[str, Any]:
    """Write the pairs to `output` and the KTO examples to `kto_output` (default: <output stem>.kto.jsonl)."""
    output = Path(output)
    kto_path = Path(kto_output) if kto_output else output.with_name(f"{output.stem}.kto.jsonl")
    for path in (output, kto_path):
        if path.resolve().parent == Path(log_dir).resolve() and path.name in LOG_FILES:
            raise DataError(f"{path}: would overwrite a log file; choose another output path")
    if kto_path.resolve() == output.resolve():
        raise DataError(f"{kto_path}: the KTO examples need a file of their own (not the pairs' file {output})")
    pairs, kto, counts = logs_to_preferences(log_dir, min_rating, max_bad_rating)
    write_jsonl(output, pairs)
    write_jsonl(kto_path, kto)
    return {
        **counts,
        "pairs_written": len(pairs),
        "kto_written": len(kto),
        "output": str(output),
        "kto_output": str(kto_path),
    }


def format_preference_counts(counts: dict[str, Any]) -> str:
    left_out = {k[len("left_out_") :]: v for k, v in counts.items() if k.startswith("left_out_") and v}
    return (
        f"wrote {counts['pairs_written']} preference pairs to {counts['output']} "
        f"({counts['pairs_from_corrections']} from corrections, {counts['pairs_from_ratings']} from differently "
        f"rated answers to the same prompt) and {counts['kto_written']} KTO examples to {counts['kto_output']} "
        f"({counts['kto_good']} good, {counts['kto_bad']} bad) from {counts['requests']} logged requests"
        + (f"; {counts['neutral_rating']} neutral ratings" if counts["neutral_rating"] else "")
        + (f"; left out: {', '.join(f'{v} {k}' for k, v in left_out.items())}" if left_out else "")
    )
