"""`afina data from-logs`: turn the server's request and feedback logs into a training file.

What goes in, per logged response (the latest feedback for an id wins):
- a correction: the conversation with the corrected answer (what the model should have said);
- a rating of at least `min_rating` and no correction: the conversation with the model's own answer;
- anything else (no feedback, unless `include_unrated`; a low rating without a correction): left out,
  counted in the summary by reason.

The output is chat-format JSONL (`{"messages": [...]}`, raw completions as one user turn) that
`afina prepare` reads as it is.

Every line is checked (valid JSON, an object, each field of the right type: a hand-edited
`"rating": "good"` or `"answer": null` is named with its file and line). By default the first bad
line stops the command with that message; with `skip_bad` (`--skip-bad`) bad lines are skipped
and counted, and the first few reasons reported. Requests logged as aborted (the client went
away mid-answer) are never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.data.load import DataError
from afina.rundir import write_jsonl

MAX_REPORTED = 5


def _field_problem(kind: str, row: dict[str, Any]) -> str | None:
    """What is wrong with a log row's fields, or None. `kind` is "request" or "feedback"."""
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "needs an 'id' (a string)"
    if kind == "feedback":
        rating = row.get("rating")
        if rating is not None and (isinstance(rating, bool) or rating not in (-1, 0, 1)):
            return f"field 'rating' is {json.dumps(rating)}; expected -1, 0, 1 or null"
        for name in ("correction", "comment"):
            if row.get(name) is not None and not isinstance(row[name], str):
                return f"field '{name}' is {json.dumps(row[name])}; expected a string or null"
        return None
    if not isinstance(row.get("answer", ""), str):
        return f"field 'answer' is {json.dumps(row['answer'])}; expected a string"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            return 'field \'messages\' must be a list of {"role": ..., "content": ...} with string values'
    elif "prompt" in row:
        if not isinstance(row["prompt"], str):
            return f"field 'prompt' is {json.dumps(row['prompt'])}; expected a string"
    else:
        return "a request line needs 'messages' or 'prompt'"
    return None


def _read_log(path: Path, kind: str, skip_bad: bool, bad: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a log; a bad line raises DataError, or with skip_bad is noted in `bad` and skipped."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if not path.is_file():
        return rows
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                problem = _field_problem(kind, row) if isinstance(row, dict) else "is not a JSON object"
            except UnicodeDecodeError:
                problem = "is not UTF-8 text"
            except json.JSONDecodeError as exc:
                problem = f"is not valid JSON ({exc.msg}; a line cut short by a crash looks like this)"
            if problem is None:
                rows.append((number, row))
                continue
            message = f"{path}:{number}: {problem}"
            if not skip_bad:
                raise DataError(f"{message}. Fix or delete that line, or pass --skip-bad to skip bad lines")
            bad.append(message)
    return rows


def logs_to_training_rows(
    log_dir: str | Path,
    min_rating: int = 1,
    include_unrated: bool = False,
    skip_bad: bool = False,
    bad: list[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training rows from `<log_dir>/requests.jsonl` and `feedback.jsonl`, and counts of what was kept or left out."""
    log_dir = Path(log_dir)
    requests_path = log_dir / "requests.jsonl"
    if not requests_path.is_file():
        raise DataError(f"{requests_path} not found: start `afina serve` with --log-dir {log_dir} to write it")
    bad = [] if bad is None else bad
    feedback = {row["id"]: row for _, row in _read_log(log_dir / "feedback.jsonl", "feedback", skip_bad, bad)}
    rows, counts = (
        [],
        {
            "requests": 0,
            "corrected": 0,
            "rated_good": 0,
            "unrated_kept": 0,
            "left_out_unrated": 0,
            "left_out_low_rating": 0,
            "left_out_empty": 0,
            "left_out_aborted": 0,
        },
    )
    for number, request in _read_log(requests_path, "request", skip_bad, bad):
        counts["requests"] += 1
        if request.get("aborted"):
            counts["left_out_aborted"] += 1
            continue
        note = feedback.get(request["id"], {})
        rating = note.get("rating")
        if note.get("correction"):
            answer, reason = note["correction"], "corrected"
        elif rating is not None and rating >= min_rating:
            answer, reason = request.get("answer", ""), "rated_good"
        elif rating is None and include_unrated:
            answer, reason = request.get("answer", ""), "unrated_kept"
        else:
            counts["left_out_unrated" if rating is None else "left_out_low_rating"] += 1
            continue
        if not answer.strip():
            counts["left_out_empty"] += 1
            continue
        if "messages" in request:
            row: dict[str, Any] = {"messages": [*request["messages"], {"role": "assistant", "content": answer}]}
        elif "prompt" in request:  # a raw completion: kept as a one-turn chat, the shape prepare writes anyway
            row = {
                "messages": [{"role": "user", "content": request["prompt"]}, {"role": "assistant", "content": answer}]
            }
        else:  # checked in _read_log
            raise DataError(f"{requests_path}:{number}: a request line needs 'messages' or 'prompt'")
        if request.get("tools"):  # a tool-calling request: the answer's <tool_call> blocks are read back by prepare
            row["tools"] = request["tools"]
        row["source"] = {"id": request["id"], "model": request.get("model"), "feedback": reason}
        rows.append(row)
        counts[reason] += 1
    return rows, counts


def from_logs(
    log_dir: str | Path, output: str | Path, min_rating: int = 1, include_unrated: bool = False, skip_bad: bool = False
) -> dict[str, Any]:
    """Write the training file; counts of what was kept, left out and (with skip_bad) skipped as malformed.

    The result's "bad_lines" holds the first few skipped lines' messages (file:line: reason).
    """
    output = Path(output)
    if output.resolve().parent == Path(log_dir).resolve() and output.name in ("requests.jsonl", "feedback.jsonl"):
        raise DataError(f"{output}: would overwrite a log file; choose another output path")
    bad: list[str] = []
    rows, counts = logs_to_training_rows(log_dir, min_rating, include_unrated, skip_bad, bad)
    write_jsonl(output, rows)
    result: dict[str, Any] = {**counts, "written": len(rows), "skipped_bad": len(bad), "bad_lines": bad[:MAX_REPORTED]}
    return result
