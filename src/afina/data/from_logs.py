"""`afina data from-logs`: turn the server's request and feedback logs into a training file.

What goes in, per logged response (the latest feedback for an id wins):
- a correction: the conversation with the corrected answer (what the model should have said);
- a rating of at least `min_rating` and no correction: the conversation with the model's own answer;
- anything else (no feedback, unless `include_unrated`; a low rating without a correction): left out,
  counted in the summary by reason.

The output is chat-format JSONL (`{"messages": [...]}`, raw completions as one user turn) that
`afina prepare` reads as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from afina.data.load import DataError, iter_json_objects
from afina.rundir import write_jsonl


def _read_log(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    if not path.is_file():
        return rows
    for number, row in iter_json_objects(path):
        if "id" not in row:
            raise DataError(f"{path}:{number}: a log line must be an object with an 'id'")
        rows.append((number, row))
    return rows


def logs_to_training_rows(log_dir: str | Path, min_rating: int = 1, include_unrated: bool = False
                          ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training rows from `<log_dir>/requests.jsonl` and `feedback.jsonl`, and counts of what was kept or left out."""
    log_dir = Path(log_dir)
    requests_path = log_dir / "requests.jsonl"
    if not requests_path.is_file():
        raise DataError(f"{requests_path} not found: start `afina serve` with --log-dir {log_dir} to write it")
    feedback = {row["id"]: row for _, row in _read_log(log_dir / "feedback.jsonl")}
    rows, counts = [], {"requests": 0, "corrected": 0, "rated_good": 0, "unrated_kept": 0,
                        "left_out_unrated": 0, "left_out_low_rating": 0, "left_out_empty": 0}
    for number, request in _read_log(requests_path):
        counts["requests"] += 1
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
            row = {"messages": [{"role": "user", "content": request["prompt"]}, {"role": "assistant", "content": answer}]}
        else:
            raise DataError(f"{requests_path}:{number}: a request line needs 'messages' or 'prompt'")
        row["source"] = {"id": request["id"], "model": request.get("model"), "feedback": reason}
        rows.append(row)
        counts[reason] += 1
    return rows, counts


def from_logs(log_dir: str | Path, output: str | Path, min_rating: int = 1, include_unrated: bool = False
              ) -> dict[str, int]:
    output = Path(output)
    if output.resolve().parent == Path(log_dir).resolve() and output.name in ("requests.jsonl", "feedback.jsonl"):
        raise DataError(f"{output}: would overwrite a log file; choose another output path")
    rows, counts = logs_to_training_rows(log_dir, min_rating, include_unrated)
    write_jsonl(output, rows)
    counts["written"] = len(rows)
    return counts
