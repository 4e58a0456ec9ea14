"""`afina prepare`: user file -> canonical, tokenizable, split rows in the run directory."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from afina.config import Recipe, RecipeError
from afina.data.format import TemplateError, chat_template_hash, encode_chat
from afina.data.load import DataError, Reject, iter_jsonl
from afina.data.schema import RowError, guess_schema, to_canonical
from afina.rundir import RunDir, file_sha256, write_json_atomic, write_jsonl

SPLITS = ("train", "validation", "test")


def split_counts(n: int, ratios: dict[str, float]) -> dict[str, int]:
    """Rows per split: proportional, rounding so that the counts add up to n."""
    total = sum(ratios.values())
    if total <= 0:
        raise RecipeError("data.split: the ratios must not all be 0")
    exact = {name: n * ratios[name] / total for name in SPLITS}
    counts = {name: int(exact[name]) for name in SPLITS}
    for name in sorted(SPLITS, key=lambda s: exact[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def split_rows(rows: list[dict[str, Any]], ratios: dict[str, float], seed: int) -> dict[str, list[dict[str, Any]]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    counts = split_counts(len(rows), ratios)
    out, start = {}, 0
    for name in SPLITS:
        out[name] = [rows[i] for i in sorted(order[start : start + counts[name]])]
        start += counts[name]
    return out


def _dedup_key(messages: list[dict[str, str]]) -> str:
    return json.dumps([(m["role"], " ".join(m["content"].split()).casefold()) for m in messages])


def prepare(recipe: Recipe, strict: bool = False) -> dict[str, Any]:
    """Read the recipe's data file, keep the usable rows, split them, and write the report."""
    from afina.models import load_tokenizer

    if not recipe.data.path:
        raise RecipeError("data.path is not set: name a JSONL file in the recipe or as data.path=FILE")
    source = recipe.resolve_path(recipe.data.path)
    run = RunDir(recipe.run_dir)
    tokenizer = load_tokenizer(recipe.model.name)
    fields = recipe.data.fields

    kept: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    seen: dict[str, int] = {}
    schema = None
    rows_in = 0
    token_lengths = []

    def reject(line: int, reason: str, raw: Any) -> None:
        item = Reject(str(source), line, reason, raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False))
        if strict:
            raise DataError(f"{source}:{line}: {reason}")
        rejects.append(item)

    for line, row in iter_jsonl(source):
        rows_in += 1
        if isinstance(row, Reject):
            reject(line, row.reason, row.raw)
            continue
        try:
            if schema is None:
                schema = guess_schema(row, fields)
            canonical = to_canonical(row, schema, fields, recipe.data.system_prompt)
            encoded = encode_chat(tokenizer, canonical["messages"], recipe.data.train_on)
        except RowError as exc:
            reject(line, str(exc), row)
            continue
        except TemplateError as exc:
            raise DataError(f"{source}:{line}: {exc}") from None
        n_tokens = len(encoded["input_ids"])
        if n_tokens > recipe.data.max_length:
            reject(line, f"{n_tokens} tokens, more than data.max_length={recipe.data.max_length}", row)
            continue
        key = _dedup_key(canonical["messages"])
        if key in seen:
            reject(line, f"exact duplicate of line {seen[key]}", row)
            continue
        seen[key] = line
        canonical["id"] = str(row.get("id", f"{source.name}:{line}"))
        canonical["source_line"] = line
        kept.append(canonical)
        token_lengths.append(n_tokens)

    if rows_in == 0:
        raise DataError(f"{source}: the file has no rows")
    if not kept:
        first = rejects[0]
        raise DataError(f"{source}: no usable rows; all {rows_in} were rejected (first, line {first.line}: {first.reason})")

    splits = split_rows(kept, recipe.data.split.model_dump(), recipe.seed)
    for name, rows in splits.items():
        write_jsonl(run.split_path(name), rows)
    write_jsonl(run.data / "rejects.jsonl", [r.to_dict() for r in rejects])

    report = {
        "source": str(source),
        "schema": schema,
        "schema_guessed": not fields,
        "rows_in": rows_in,
        "kept": len(kept),
        "rejected": len(rejects),
        "rejected_by_reason": dict(Counter(re.sub(r"\d+", "N", r.reason) for r in rejects)),
        "splits": {name: len(rows) for name, rows in splits.items()},
        "tokens": {
            "total": sum(token_lengths),
            "min": min(token_lengths),
            "mean": round(sum(token_lengths) / len(token_lengths), 1),
            "max": max(token_lengths),
        },
    }
    write_json_atomic(run.data / "report.json", report)
    run.update_manifest(
        data={
            "source": str(source),
            "source_sha256": file_sha256(source),
            "splits_sha256": {name: file_sha256(run.split_path(name)) for name in SPLITS},
            "chat_template_sha256": chat_template_hash(tokenizer),
        }
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"data: {report['source']} (schema: {report['schema']}{', guessed' if report['schema_guessed'] else ''})",
        f"rows: {report['rows_in']} in, {report['kept']} kept, {report['rejected']} rejected",
    ]
    for reason, count in report["rejected_by_reason"].items():
        lines.append(f"  rejected {count}: {reason}")
    s = report["splits"]
    t = report["tokens"]
    lines.append(f"splits: train {s['train']}, validation {s['validation']}, test {s['test']}")
    lines.append(f"tokens per example: min {t['min']}, mean {t['mean']}, max {t['max']} ({t['total']} in all)")
    return "\n".join(lines)
