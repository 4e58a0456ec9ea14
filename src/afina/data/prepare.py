"""`afina prepare`: user data -> clean, deduplicated, canonical, split rows in the run directory.

Rows stream through load -> map -> clean -> length -> exact dedup -> near dedup one at a time; the
kept rows wait in a temporary spool file while only small facts about each (hash, signature, label,
group, length) stay in memory. Then the rows are split, rows of train (and validation) that leak
into a later split are removed, the splits are written, and the report accounts for every row:

    rows in = rows in the splits + rows in rejects.jsonl
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afina.config import Recipe, RecipeError
from afina.data.clean import TextCleaner, is_empty
from afina.data.dedup import NearDuplicateIndex, exact_key
from afina.data.format import Chunking, TemplateError, chat_template_hash, count_chunks, count_tokens
from afina.data.load import DataError, Record, Reject, hf_split_names, iter_source
from afina.data.mixture import format_tasks_report, prepare_tasks
from afina.data.report import write_html_report
from afina.data.schema import RowError, content_text, guess_schema, to_canonical
from afina.models import load_tokenizer
from afina.rundir import SPLITS, JsonlWriter, RunDir, file_sha256, write_json_atomic

STEPS = ("load", "map", "clean", "length", "exact_dedup", "near_dedup", "leak")
STRICT_STEPS = ("load", "map", "clean")  # malformed input; the later steps filter well-formed rows
HF_SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}
EXAMPLES_PER_REASON = 3


def split_counts(n: int, ratios: dict[str, float]) -> dict[str, int]:
    """Rows per split: proportional, rounding so that the counts add up to n."""
    total = sum(ratios.get(name, 0.0) for name in SPLITS)
    if total <= 0:
        raise RecipeError("data.split: the ratios must not all be 0")
    exact = {name: n * ratios.get(name, 0.0) / total for name in SPLITS}
    counts = {name: int(exact[name]) for name in SPLITS}
    for name in sorted(SPLITS, key=lambda s: exact[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def assign_splits(
    labels: list[str | None], groups: list[str | None], ratios: dict[str, float], seed: int, stratify: bool = True
) -> list[str]:
    """The split of each row: seeded; rows sharing a group stay together; else each label split by ratio."""
    rng = random.Random(seed)
    n = len(labels)
    out = [""] * n
    if any(g is not None for g in groups):
        units: dict[Any, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            units[("group", group) if group is not None else ("row", i)].append(i)
        order = list(units.values())
        rng.shuffle(order)
        targets = split_counts(n, ratios)
        filled: Counter[str] = Counter()
        for unit in order:  # each whole group goes where the most rows are still missing
            name = max(SPLITS, key=lambda s: (targets[s] - filled[s], targets[s]))
            for i in unit:
                out[i] = name
            filled[name] += len(unit)
        return out
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        strata[label if stratify else None].append(i)
    for key in sorted(strata, key=str):
        members = strata[key]
        rng.shuffle(members)
        start = 0
        for name, count in split_counts(len(members), ratios).items():
            for i in members[start : start + count]:
                out[i] = name
            start += count
    return out


@dataclass
class KeptRow:
    """What stays in memory of a kept row; the row itself waits in the spool file."""

    origin: str  # "pool" (to be split by ratios) or the split a given file fills
    where: str  # file:line, for messages
    key: bytes
    tokens: int
    label: str | None
    group: str | None


class Ledger:
    """Counts rows in and rejects by step and reason; writes data/rejects.jsonl as rejects come."""

    def __init__(self, path: Path, strict: bool):
        self.strict = strict
        self.writer = JsonlWriter(path)
        self.rows_in = 0
        self.by_step: dict[str, Counter[str]] = {step: Counter() for step in STEPS}
        self.examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.first: Reject | None = None

    def reject(self, item: Reject, step: str, raw: Any = None) -> None:
        item.step = step
        if raw is not None and not item.raw:
            item.raw = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        if self.strict and step in STRICT_STEPS:
            raise DataError(
                item.message() + " (stopped by --strict; without it the row is rejected and preparation goes on)"
            )
        reason = generic_reason(item.reason)
        self.by_step[step][reason] += 1
        if len(self.examples[f"{step}: {reason}"]) < EXAMPLES_PER_REASON:
            self.examples[f"{step}: {reason}"].append(item.to_dict())
        self.first = self.first or item
        self.writer.write(item.to_dict())

    @property
    def rejected(self) -> int:
        return sum(sum(c.values()) for c in self.by_step.values())


def generic_reason(reason: str) -> str:
    """A reason with its particulars (numbers, quoted values, file:line) folded, to group rejects."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\S+:\d+\b", "FILE:LINE", reason)
    return re.sub(r"(?<![=\w])\d+(\.\d+)?", "N", reason)  # a recipe value (max_length=512) stays


REASON_WORDING = (  # a reason's template (generic_reason) as words for the printed summary
    (re.compile(r"\s*\(similarity N\)"), ""),
    (re.compile(r" of (validation|test) row FILE:LINE"), r" of a \1 row"),
    (re.compile(r" of FILE:LINE"), " of an earlier row"),
    (re.compile(r" \(which has label '…', this row '…'\)"), " (with another label)"),
    (re.compile(r"^N tokens, "), ""),
    (re.compile(r" at column N\b"), ""),
)


def reason_label(template: str) -> str:
    """`near duplicate (similarity N) of FILE:LINE` -> `near duplicate of an earlier row`: what a person reads
    next to a count (a real example of the reason is printed beside it)."""
    for pattern, words in REASON_WORDING:
        template = pattern.sub(words, template)
    return template


def data_sources(recipe: Recipe) -> list[tuple[str, Path, str | None]]:
    """(origin, path, HF split) for every input: the pool to split, and files that fill a split themselves."""
    data = recipe.data
    if not data.path:
        raise RecipeError("data.path is not set: name a data file or folder in the recipe or as data.path=FILE")
    path = recipe.resolve_path(data.path)
    given = {"validation": data.validation_path, "test": data.test_path}
    sources: list[tuple[str, Path, str | None]] = []
    split_names = hf_split_names(path) if path.is_dir() and data.format in ("auto", "hf") else None
    if split_names:  # a saved DatasetDict: its train/validation/test splits are given splits
        for name in split_names:
            origin = HF_SPLIT_NAMES.get(name)
            if origin is None or (origin != "train" and given.get(origin)):
                continue
            sources.append(("pool" if origin == "train" else origin, path, name))
        if not any(origin == "pool" for origin, _, _ in sources):
            sources.insert(0, ("pool", path, split_names[0]))
    else:
        sources.append(("pool", path, None))
    sources += [(origin, recipe.resolve_path(p), None) for origin, p in given.items() if p]
    return sources


def prepare_data(
    recipe: Recipe, strict: bool = False, chunking: Chunking | None = None, schemas: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Read the recipe's data, keep the usable rows, split them, and write the rows and the report.

    `chunking` (domain adaptation, from the task type): rows are documents of text, cut into chunks when
    encoded, so none is rejected for length; the report counts the chunks per split. `schemas` (from the
    task type): the row shapes guessed among (default: all but the preference ones).
    """
    if recipe.data.sources:  # multi-task: each source prepared as its own task, then mixed
        return prepare_tasks(recipe, strict, prepare_one=prepare_data)
    sources = data_sources(recipe)
    run = RunDir(recipe.run_dir)
    run.data.mkdir(parents=True, exist_ok=True)
    intake = Intake(
        recipe,
        load_tokenizer(recipe.model.name, recipe.model.chat_template),
        Ledger(run.data / "rejects.jsonl", strict),
        long_documents=chunking is not None,
        schemas=schemas,
    )
    spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=run.data, prefix=".kept-")
    try:
        for origin, path, hf_split in sources:
            items = iter_source(path, recipe.data.format, recipe.data.text_unit, hf_split)
            if recipe.data.documents is not None:
                items = join_documents(items, recipe.data.documents)
            for item in items:
                row = intake.take(origin, item)
                if row is not None:
                    spool.write(json.dumps(row, ensure_ascii=False) + "\n")
        intake.check_kept(sources[0][1])
        split_of, ratios = intake.split()
        leaks = intake.remove_leaks(split_of)
        write_splits(run, spool, split_of)
        intake.ledger.writer.close()
    except BaseException:
        intake.ledger.writer.discard()
        raise
    finally:
        spool.close()

    kept = intake.kept
    warnings = check_splits(kept, split_of, intake.schema, ratios)
    if strict and warnings:
        raise DataError(f"{sources[0][1]}: {warnings[0]} (stopped by --strict)")
    report = build_report(
        recipe,
        sources,
        intake.schema,
        intake.mapping,
        intake.ledger,
        kept,
        split_of,
        intake.cleaner,
        warnings,
        leaks,
        chunking,
    )
    report["length_warning"] = length_warning(recipe, intake.lengths, report, model_window(intake.tokenizer))
    write_json_atomic(run.data / "report.json", report)
    write_html_report(run.data / "report.html", report)
    run.update_manifest(
        data={
            "source": str(sources[0][1]),
            "source_sha256": source_fingerprint(sources[0][1]),
            "inputs": {
                f"{origin}:{path}" + (f"[{split}]" if split else ""): source_fingerprint(path)
                for origin, path, split in sources
            },
            "schema": intake.schema,
            "splits_sha256": {name: file_sha256(run.split_path(name)) for name in SPLITS},
            "chat_template_sha256": chat_template_hash(intake.tokenizer),
        }
    )
    return report


class Intake:
    """Rows through the steps one at a time (map, clean, length, exact and near dedup), rejects into the
    ledger with their reason; what is kept is remembered (KeptRow) for the split, the row itself returned."""

    def __init__(
        self, recipe: Recipe, tokenizer, ledger: Ledger, long_documents: bool, schemas: tuple[str, ...] | None = None
    ):
        self.recipe, self.data, self.tokenizer, self.ledger = recipe, recipe.data, tokenizer, ledger
        self.schemas = schemas
        self.long_documents = long_documents  # domain adaptation: cut into chunks when encoded, never too long
        self.cleaner = TextCleaner(recipe.data.clean, recipe.data.pii)
        self.kept: list[KeptRow] = []
        self.first_of: dict[str, dict[bytes, int]] = defaultdict(dict)  # origin -> exact key -> kept index
        self.near: dict[str, NearDuplicateIndex] = {}
        self.schema: str | None = None
        self.mapping = ""
        self.lengths: list[int] = []  # tokens of every row measured by the length step (kept or not)

    def take(self, origin: str, item: Record | Reject) -> dict[str, Any] | None:
        """The canonical row to keep, or None (rejected, with its reason in the ledger)."""
        self.ledger.rows_in += 1
        if isinstance(item, Reject):
            self.ledger.reject(item, "load")
            return None
        if origin == "pool" and self.data.split_field:
            own = self.split_of_row(item)
            if own is None:
                return None
            origin = own
        row = self.mapped(item)
        row = self.cleaned(item, row) if row is not None else None
        n_tokens = self.token_count(item, row) if row is not None else None
        if row is None or n_tokens is None:
            return None
        text = content_text(row)
        key = exact_key(text)
        if self.duplicate(origin, item, row, text, key):
            return None
        where = f"{item.file}:{item.line}"
        self.first_of[origin].setdefault(key, len(self.kept))
        user_id = item.row.get(self.data.fields.get("id", "id"))
        row = {"id": str(user_id) if user_id is not None else where, **row, "source": where}
        self.kept.append(
            KeptRow(origin, where, key, n_tokens, row.get("label"), row["group"] if self.data.group_by else None)
        )
        return row

    def split_of_row(self, record: Record) -> str | None:
        """data.split_field: where the row's own split value sends it ("pool", a split), or None (dropped or
        rejected, in the ledger)."""
        field, values = self.data.split_field, self.data.split_values
        value = record.row.get(field) if field else None
        target: str | None = values.get(str(value)) if value is not None else None
        if target is None and str(value) in SPLITS:
            target = str(value)
        if target is None:
            listed = ", ".join(sorted(values)) or "none"
            reason = (
                f"missing field '{field}' (data.split_field)"
                if value is None
                else f"{field}={value!r} is not in data.split_values (listed: {listed}) and names no split"
            )
            self.ledger.reject(Reject(record.file, record.line, reason), "map", record.row)
            return None
        if target == "drop":
            self.ledger.reject(
                Reject(record.file, record.line, f"{field}={value!r}: dropped by data.split_values"), "map", record.row
            )
            return None
        return target

    def mapped(self, record: Record) -> dict[str, Any] | None:
        """map: the user's fields onto a canonical row (the schema guessed from the first row)."""
        data = self.data
        try:
            row = record.row
            if data.prompt_template is not None:
                row = {**row, data.fields.get("prompt", "prompt"): render_prompt(data.prompt_template, row)}
            if self.schema is None:
                self.schema, self.mapping = guess_schema(
                    row, data.fields, "text" if self.long_documents else data.schema_, among=self.schemas
                )
            return to_canonical(row, self.schema, data.fields, data.system_prompt, data.group_by)
        except RowError as exc:
            self.ledger.reject(Reject(record.file, record.line, str(exc)), "map", record.row)
            return None

    def cleaned(self, record: Record, row: dict[str, Any]) -> dict[str, Any] | None:
        """clean: normalise text, redact PII; empty rows go."""
        row = self.cleaner.clean_row(row)
        empty = is_empty(row)
        if empty:
            self.ledger.reject(Reject(record.file, record.line, empty), "clean", record.row)
            return None
        return row

    def token_count(self, record: Record, row: dict[str, Any]) -> int | None:
        """length, with the model's tokenizer and chat template; None when out of bounds."""
        data = self.data
        try:
            n_tokens = count_tokens(self.tokenizer, row, data.train_on)
        except TemplateError as exc:
            raise DataError(f"{record.file}:{record.line}: {exc}") from None
        self.lengths.append(n_tokens)
        too_long = n_tokens > data.max_length and not self.long_documents
        if too_long or n_tokens < data.clean.min_tokens:
            bound = (
                f"more than data.max_length={data.max_length}"
                if n_tokens > data.max_length
                else f"fewer than data.clean.min_tokens={data.clean.min_tokens}"
            )
            self.ledger.reject(Reject(record.file, record.line, f"{n_tokens} tokens, {bound}"), "length", record.row)
            return None
        return n_tokens

    def duplicate(self, origin: str, record: Record, row: dict[str, Any], text: str, key: bytes) -> bool:
        """Exact, then near duplicates within the same input (across inputs they are leaks, removed later)."""
        dedup = self.data.dedup
        seen = self.first_of[origin].get(key) if dedup.exact else None
        if seen is not None:
            self.ledger.reject(
                Reject(record.file, record.line, _duplicate_reason("exact duplicate", self.kept[seen], row)),
                "exact_dedup",
                record.row,
            )
            return True
        if not dedup.near:
            return False
        if origin not in self.near:
            self.near[origin] = NearDuplicateIndex(dedup.threshold, dedup.num_perm, dedup.shingle)
        index = self.near[origin]
        minhash = index.signature(text)
        match = index.find(minhash)
        if match is not None:
            first = self.kept[int(match[0])]
            reason = _duplicate_reason(f"near duplicate (similarity {match[1]:.2f})", first, row)
            self.ledger.reject(Reject(record.file, record.line, reason), "near_dedup", record.row)
            return True
        index.add(str(len(self.kept)), minhash)
        return False

    def check_kept(self, source: Path) -> None:
        ledger = self.ledger
        if ledger.rows_in == 0:
            raise DataError(f"{source}: no rows to read")
        if not self.kept:
            first = ledger.first
            assert first is not None  # every row in was rejected, so there is a first reject
            raise DataError(
                f"{source}: no usable rows; all {ledger.rows_in} were rejected "
                f"(first, {first.file}:{first.line}: {first.reason})"
            )

    def split(self) -> tuple[list[str], dict[str, float]]:
        """split: the pool by seeded ratios (grouped or stratified); given files fill their own split.
        (each kept row's split, the ratios the pool was split by)"""
        kept, data = self.kept, self.data
        # Splits filled by given files or split values take no share of the pool; train rows given by
        # data.split_values join the pool's train share.
        given = {k.origin for k in kept if k.origin not in ("pool", "train")}
        ratios = {name: (0.0 if name in given else getattr(data.split, name)) for name in SPLITS}
        pool = [i for i, k in enumerate(kept) if k.origin == "pool"]
        stratify = data.stratify and self.schema == "classification"
        pool_splits = (
            assign_splits(
                [kept[i].label for i in pool],
                [kept[i].group for i in pool],
                ratios,
                self.recipe.seed,
                stratify=stratify,
            )
            if pool
            else []
        )
        split_of = [k.origin for k in kept]
        for i, name in zip(pool, pool_splits):
            split_of[i] = name
        return split_of, ratios

    def remove_leaks(self, split_of: list[str]) -> dict[int, str]:
        """leaks: a train (or validation) row equal or near to a row of a later split is removed from it."""
        dedup = self.data.dedup
        leaks = find_leaks(self.kept, split_of, self.near if dedup.near else None, dedup.threshold)
        for i, reason in leaks.items():
            file, _, line = self.kept[i].where.rpartition(":")
            self.ledger.reject(Reject(file, int(line), reason), "leak")
            split_of[i] = ""
        return leaks


def render_prompt(template: str, row: dict[str, Any]) -> str:
    """data.prompt_template filled with the row's fields; a list becomes one item per line."""
    values = {key: "\n".join(map(str, v)) if isinstance(v, list) else v for key, v in row.items()}
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise RowError(f"data.prompt_template names field {exc} that the row lacks (it has {sorted(row)})") from None
    except (ValueError, IndexError) as exc:
        raise RecipeError(f"data.prompt_template is not a valid template: {exc}") from None


def join_documents(items, documents) -> Iterator[Record | Reject]:
    """Consecutive rows sharing `documents.by` as one row: each field of `documents.join` joined line by line
    (the document's first row gives the other fields, its file and line); `first_line_as` moves the first line
    of the first joined field (a headline) into a field of its own."""
    current: list[Record] = []

    def document() -> Record:
        first = current[0]
        row = dict(first.row)
        for name in documents.join:
            row[name] = "\n".join(str(r.row.get(name, "")) for r in current)
        if documents.first_line_as:
            head, _, rest = row[documents.join[0]].partition("\n")
            row[documents.first_line_as], row[documents.join[0]] = head, rest
        return Record(first.file, first.line, row)

    for item in items:
        if isinstance(item, Reject):
            yield item
            continue
        if current and item.row.get(documents.by) != current[0].row.get(documents.by):
            yield document()
            current = []
        current.append(item)
    if current:
        yield document()


def write_splits(run: RunDir, spool, split_of: list[str]) -> None:
    """data/{train,validation,test}.jsonl from the spooled kept rows, in input order."""
    writers = {name: JsonlWriter(run.split_path(name)) for name in SPLITS}
    spool.seek(0)
    for i, line in enumerate(spool):
        if split_of[i]:
            writers[split_of[i]].write(json.loads(line))
    for writer in writers.values():
        writer.close()


def _duplicate_reason(kind: str, first: KeptRow, row: dict[str, Any]) -> str:
    reason = f"{kind} of {first.where}"
    if first.label is not None and row.get("label") != first.label:
        reason += f" (which has label '{first.label}', this row '{row.get('label')}')"
    return reason


def find_leaks(
    kept: list[KeptRow], split_of: list[str], near: dict[str, NearDuplicateIndex] | None, threshold: float
) -> dict[int, str]:
    """Rows of train (vs validation and test) and of validation (vs test) that duplicate a later split."""
    later = {"train": ("test", "validation"), "validation": ("test",)}
    exact: dict[str, dict[bytes, int]] = {"validation": {}, "test": {}}
    indexes: dict[str, NearDuplicateIndex] = {}
    for i, split in enumerate(split_of):
        if split in exact:
            exact[split].setdefault(kept[i].key, i)
            if near is not None:
                signatures = near[kept[i].origin].signatures
                if split not in indexes:
                    model = near[kept[i].origin]
                    indexes[split] = NearDuplicateIndex(threshold, model.num_perm, model.shingle)
                index = indexes[split]
                index.add(str(i), index.minhash_from(signatures[str(i)]))
    leaks: dict[int, str] = {}
    for i, split in enumerate(split_of):
        for other in later.get(split, ()):
            j = exact[other].get(kept[i].key)
            if j is not None:
                leaks[i] = f"leak: exact duplicate of {other} row {kept[j].where}; removed from {split}"
                break
            if near is not None and other in indexes:
                match = indexes[other].find(indexes[other].minhash_from(near[kept[i].origin].signatures[str(i)]))
                if match is not None:
                    j = int(match[0])
                    leaks[i] = (
                        f"leak: near duplicate (similarity {match[1]:.2f}) of {other} row {kept[j].where}; removed "
                        f"from {split}"
                    )
                    break
    return leaks


def check_splits(kept: list[KeptRow], split_of: list[str], schema: str | None, ratios: dict[str, float]) -> list[str]:
    """Problems of the data as a whole (not of one row): a single class, empty splits, unseen labels."""
    warnings = []
    labels = {name: Counter(k.label for k, s in zip(kept, split_of) if s == name) for name in SPLITS}
    if schema == "classification":
        classes = set().union(*labels.values())
        if len(classes) == 1:
            warnings.append(
                f"every kept row has the label '{next(iter(classes))}'; a classifier needs two classes or more"
            )
        for name in ("validation", "test"):
            unseen = sorted(set(labels[name]) - set(labels["train"]), key=str)
            if unseen:
                warnings.append(f"{name} has label(s) that train lacks: {', '.join(map(str, unseen[:10]))}")
    counts = Counter(split_of)
    for name in SPLITS:
        if counts[name] == 0 and (ratios.get(name, 0) > 0 or any(k.origin == name for k in kept)):
            warnings.append(f"the {name} split is empty; give more data or change data.split")
    return warnings


def source_fingerprint(path: Path) -> str:
    """sha256 of a file, or of the sorted (name, sha256) list of a folder's files."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path)}\0{file_sha256(file)}\n".encode())
    return h.hexdigest()


def build_report(
    recipe: Recipe,
    sources,
    schema,
    mapping,
    ledger: Ledger,
    kept: list[KeptRow],
    split_of: list[str],
    cleaner: TextCleaner,
    warnings: list[str],
    leaks: dict[int, str],
    chunking: Chunking | None = None,
) -> dict[str, Any]:
    data = recipe.data
    steps, rows = [], ledger.rows_in
    for step in STEPS:
        rejected = sum(ledger.by_step[step].values())
        steps.append(
            {
                "step": step,
                "rows_in": rows,
                "kept": rows - rejected,
                "rejected": rejected,
                "rejected_by_reason": dict(ledger.by_step[step].most_common()),
            }
        )
        rows -= rejected
    split_sizes = {name: split_of.count(name) for name in SPLITS}
    lengths = {name: [k.tokens for k, s in zip(kept, split_of) if s == name] for name in SPLITS}
    all_lengths = [n for name in SPLITS for n in lengths[name]]
    edges = (
        np.histogram_bin_edges(all_lengths, bins=min(30, max(1, len(set(all_lengths)))))
        if all_lengths
        else np.array([0, 1])
    )
    report = {
        "source": str(sources[0][1]),
        "inputs": [{"origin": o, "path": str(p), **({"hf_split": s} if s else {})} for o, p, s in sources],
        "schema": schema,
        "schema_guessed": data.schema_ == "auto",
        "field_mapping": mapping,
        "rows_in": ledger.rows_in,
        "kept": sum(split_sizes.values()),
        "rejected": ledger.rejected,
        "rejected_by_reason": {
            f"{step}: {reason}": n for step in STEPS for reason, n in ledger.by_step[step].most_common()
        },
        "steps": steps,
        "splits": split_sizes,
        "split_method": _split_method(kept, schema, data.stratify),
        "cleaning": {
            "rows_changed": dict(cleaner.rows_changed),
            "pii_redacted": dict(cleaner.redacted),
            "pii_redaction": data.pii.redact,
        },
        "dedup": {
            "exact": steps[4]["rejected"],
            "near": steps[5]["rejected"],
            "near_threshold": data.dedup.threshold,
            "leaks_removed": len(leaks),
        },
        "tokens": _token_stats(all_lengths),
        "tokens_per_split": {name: _token_stats(lengths[name]) for name in SPLITS},
        "token_histogram": {
            "edges": [round(float(e), 1) for e in edges],
            "counts": {name: np.histogram(lengths[name], bins=edges)[0].tolist() for name in SPLITS},
        },
        "truncation": {
            "max_length": data.max_length,
            "rows_over_max_length": sum(n for reason, n in ledger.by_step["length"].items() if "max_length" in reason),
            "action": "rejected, never cut silently: raise data.max_length to keep them",
        },
        "labels": (
            {name: dict(Counter(k.label for k, s in zip(kept, split_of) if s == name).most_common()) for name in SPLITS}
            if schema == "classification"
            else None
        ),
        "warnings": warnings,
        "reject_examples": dict(ledger.examples),
    }
    if schema == "tagging":
        report["labels"] = None
    if chunking is not None:
        report["domain"] = domain_chunks(chunking, kept, split_of)
        report["truncation"]["action"] = (
            "domain adaptation: long documents are cut into chunks, none rejected for length"
        )
    return report


# More rows than this share rejected for length is said loudly at the end of prepare.
LOUD_LENGTH_SHARE = 0.05
KEEP_SHARE = 0.95


def model_window(tokenizer) -> int | None:
    """The model's context window (max_position_embeddings of its config.json), or None when unknown."""
    config = Path(str(getattr(tokenizer, "name_or_path", ""))) / "config.json"
    try:
        window = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        window = None
    if window is None:
        limit = getattr(tokenizer, "model_max_length", None)
        window = limit if isinstance(limit, int) and limit < 1_000_000 else None
    return int(window) if window else None


def length_warning(recipe: Recipe, lengths: list[int], report: dict[str, Any], window: int | None) -> str | None:
    """When more than LOUD_LENGTH_SHARE of the rows measured were rejected as too long: how many, and the
    data.max_length that keeps KEEP_SHARE of them (the data's own length percentile, capped at the window)."""
    too_long = report["truncation"]["rows_over_max_length"]
    if not lengths or too_long <= LOUD_LENGTH_SHARE * len(lengths):
        return None
    keep = int(math.ceil(float(np.percentile(lengths, 100 * KEEP_SHARE))))
    capped = window is not None and keep > window
    suggestion = min(keep, window) if window is not None else keep
    kept_then = sum(n <= suggestion for n in lengths) / len(lengths)
    return (
        f"{too_long} of {len(lengths)} rows ({100 * too_long / len(lengths):.1f}%) were rejected as longer than "
        f"data.max_length={recipe.data.max_length}. data.max_length={suggestion} would keep "
        f"{100 * kept_then:.0f}% of them"
        + (f" (capped at the model's window of {window} tokens; {keep} would keep 95%)" if capped else "")
        + "; longer rows cost memory and time (`afina estimate` says how much)."
    )


def domain_chunks(chunking: Chunking, kept: list[KeptRow], split_of: list[str]) -> dict[str, Any]:
    """Domain adaptation: how the documents of each split fall into chunks of tokens."""
    length, overlap = chunking.length, chunking.overlap
    eos = int(chunking.add_eos)
    chunks = {
        name: sum(count_chunks(k.tokens + eos, length, overlap) for k, s in zip(kept, split_of) if s == name)
        for name in SPLITS
    }
    split_docs = sum(1 for k, s in zip(kept, split_of) if s and k.tokens + eos > length)
    return {
        "chunk_length": length,
        "overlap": overlap,
        "add_eos": chunking.add_eos,
        "chunks": chunks,
        "documents_split": split_docs,
    }


def _split_method(kept: list[KeptRow], schema: str | None, stratify: bool) -> str:
    given = sorted({k.origin for k in kept} - {"pool"})
    method = "seeded ratios"
    if any(k.group is not None for k in kept if k.origin == "pool"):
        method += ", group-aware (rows sharing a group stay in one split)"
    elif schema == "classification" and stratify:
        method += ", stratified by label"
    if given:
        method += f"; {', '.join(given)} from given file(s)"
    return method


def _token_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"total": 0, "min": 0, "mean": 0, "max": 0}
    return {
        "total": int(sum(lengths)),
        "min": int(min(lengths)),
        "mean": round(sum(lengths) / len(lengths), 1),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(max(lengths)),
    }


def format_report(report: dict[str, Any]) -> str:
    """The short summary printed at the end of `afina prepare`."""
    if report.get("mixture"):
        return format_tasks_report(report)
    lines = [
        *([report["task_inferred"]] if report.get("task_inferred") else []),
        f"data: {report['source']} (schema: {report['schema']}"
        f"{', guessed' if report['schema_guessed'] else ''}: {report['field_mapping']})",
        f"rows: {report['rows_in']} in, {report['kept']} kept, {report['rejected']} rejected",
    ]
    examples = report.get("reject_examples", {})
    for step in report["steps"]:
        if step["rejected"]:
            lines.append(f"  {step['step']:<11} -{step['rejected']}")
            grouped: dict[str, list[Any]] = {}  # reason in words -> [count, first real example]
            for reason, count in step["rejected_by_reason"].items():
                entry = grouped.setdefault(reason_label(reason), [0, None])
                entry[0] += count
                entry[1] = entry[1] or (examples.get(f"{step['step']}: {reason}") or [None])[0]
            reasons = sorted(grouped.items(), key=lambda item: -item[1][0])
            for label, (count, example) in reasons[:4]:
                lines.append(f"      {count:>6}  {label}")
                if example:
                    lines.append(f"              e.g. {example['file']}:{example['line']}: {example['reason']}")
            if len(reasons) > 4:
                rest = sum(entry[0] for _, entry in reasons[4:])
                lines.append(
                    f"      {rest:>6}  for {len(reasons) - 4} other reasons (data/report.json, data/rejects.jsonl)"
                )
    c = report["cleaning"]
    if c["rows_changed"]:
        lines.append("cleaned: " + ", ".join(f"{op} {n} rows" for op, n in c["rows_changed"].items()))
    if c["pii_redacted"]:
        lines.append("PII redacted: " + ", ".join(f"{kind} {n}" for kind, n in c["pii_redacted"].items()))
    s, t = report["splits"], report["tokens"]
    lines.append(
        f"splits: train {s['train']}, validation {s['validation']}, test {s['test']} ({report['split_method']})"
    )
    lines.append(f"tokens per example: min {t['min']}, mean {t['mean']}, max {t['max']} ({t['total']} in all)")
    if report.get("domain"):
        d = report["domain"]
        lines.append(
            f"chunks of {d['chunk_length']} tokens (overlap {d['overlap']}): train {d['chunks']['train']}, "
            f"validation {d['chunks']['validation']}, test {d['chunks']['test']}; "
            f"{d['documents_split']} documents longer than a chunk were split"
        )
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    if report.get("length_warning"):
        lines.append(f"WARNING: {report['length_warning']}")
    return "\n".join(lines)
