"""Read user data row by row, whatever the container; bad rows become rejects with file, line and reason.

Every reader is a generator that yields a `Record` (a dict row with the file and line it came from)
or a `Reject`, one at a time, so memory does not grow with the file size:

    for item in iter_source(Path("data/")):          # a file, a folder of files, or a saved HF dataset
        if isinstance(item, Reject): ...               # item.file, item.line, item.reason
        else: use(item.row)

Formats: JSON Lines, JSON (an array of rows, streamed; or an object of equal-length columns / one
list of rows), CSV and TSV (with a header row), Parquet, plain text (a row per paragraph, line or
file), and Hugging Face datasets saved with `save_to_disk` (class-label ids become their names).
The "line" of a Parquet, JSON-object or HF row is its 1-based row number. Input files are only read.
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
JSON_CHUNK_CHARS = 1 << 20


class DataError(ValueError):
    """Data that cannot be used at all (or a bad row under --strict); names the file and line."""


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    raw: str = ""
    step: str = "load"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "step": self.step, "reason": self.reason, "raw": self.raw[:2000]}

    def message(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Record:
    file: str
    line: int
    row: dict[str, Any] = field(default_factory=dict)


Item = Record | Reject


def detect_format(path: Path) -> str:
    """The reader for a path: by its suffix, or 'hf'/'folder' for directories."""
    if path.is_dir():
        return "hf" if any((path / marker).is_file() for marker in HF_MARKERS) else "folder"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise DataError(f"{path}: cannot tell the file format from its name (known: {known}); set data.format")
    return fmt


def iter_source(
    path: Path, fmt: str = "auto", text_unit: str = "paragraph", hf_split: str | None = None
) -> Iterator[Item]:
    """Every row of a file, folder or saved HF dataset, in order, as Record or Reject."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "folder":
        yield from _iter_folder(path, text_unit)
        return
    if fmt == "hf":
        yield from iter_hf_dataset(path, hf_split)
        return
    if path.is_dir():
        raise DataError(f"{path}: is a folder, but data.format={fmt} names a file format")
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror}") from None
    if empty:
        yield Reject(str(path), 0, "the file is empty")
        return
    readers = {"jsonl": iter_jsonl, "json": iter_json, "csv": iter_csv, "tsv": iter_tsv, "parquet": iter_parquet}
    try:
        if fmt == "text":
            yield from iter_text(path, text_unit)
        else:
            yield from readers[fmt](path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _iter_folder(folder: Path, text_unit: str) -> Iterator[Item]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{folder}: the folder holds no data files")
    for path in files:
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            yield Reject(str(path), 0, f"skipped: unsupported file type '{path.suffix or path.name}' in a data folder")
            continue
        yield from iter_source(path, fmt, text_unit)


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None when not UTF-8, raw bytes); a leading BOM is dropped, CRLF kept as is."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            try:
                yield number, raw.decode("utf-8"), raw
            except UnicodeDecodeError:
                yield number, None, raw


def _utf8_reason(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start} of the line"
    return "invalid UTF-8"


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for a JSONL file that afina itself reads whole and trusts line by line
    (a RAG corpus, a probe, a request log): a malformed line is an error naming it, not a reject."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            yield number, row


def iter_jsonl(path: Path) -> Iterator[Item]:
    """One JSON object per line; blank lines are skipped (a file of blank lines is empty)."""
    seen_any = False
    for number, text, raw in _decoded_lines(path):
        if text is None:
            seen_any = True
            yield Reject(str(path), number, _utf8_reason(raw), raw.decode("utf-8", "replace"))
            continue
        text = text.strip()
        if not text:
            continue
        seen_any = True
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Reject(str(path), number, f"invalid JSON: {exc.msg} at column {exc.colno}", text)
            continue
        if not isinstance(row, dict):
            yield Reject(str(path), number, f"a row must be a JSON object, got {_json_type(row)}", text)
            continue
        yield Record(str(path), number, row)
    if not seen_any:
        yield Reject(str(path), 0, "the file is empty")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _text_chunks(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as fh:
        first = True
        while True:
            block = fh.read(JSON_CHUNK_CHARS)
            if first and block.startswith(BOM):
                block = block[len(BOM) :]
            first = False
            if not block:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                return
            yield decoder.decode(block)


def iter_json(path: Path) -> Iterator[Item]:
    """A JSON array of row objects, read element by element; or an object of columns / of one row list.

    An array is streamed: only the element being parsed is held in memory. An object is read whole.
    A syntax error inside the array stops the file there (JSON cannot be resynchronised), as one reject.
    """
    chunks = _text_chunks(path)
    decoder = json.JSONDecoder()
    buf, pos, line = "", 0, 1
    try:
        while True:  # find the first character
            while pos < len(buf) and buf[pos].isspace():
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf):
                break
            more = next(chunks, None)
            if more is None:
                yield Reject(str(path), 0, "the file is empty")
                return
            buf, pos = buf[pos:] + more, 0
        if buf[pos] == "{":
            yield from _iter_json_object(path, buf[pos:] + "".join(chunks), line)
            return
        if buf[pos] != "[":
            yield Reject(
                str(path), line, "a JSON file must hold an array of rows or an object of columns", buf[pos : pos + 200]
            )
            return
        pos += 1
        index = 0
        expect_comma = False
        while True:
            while pos < len(buf) and (buf[pos].isspace() or (buf[pos] == "," and expect_comma)):
                if buf[pos] == ",":
                    expect_comma = False
                line += buf[pos] == "\n"
                pos += 1
            if pos >= len(buf) or (buf[pos] not in "]" and len(buf) - pos < 64):
                more = next(chunks, None)
                if more is not None:
                    buf, pos = buf[pos:] + more, 0
                    continue
                if pos >= len(buf):
                    yield Reject(str(path), line, "invalid JSON: the array is not closed with ']'")
                    return
            if buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                more = next(chunks, None)
                if more is not None:  # maybe the element is only cut by the chunk boundary
                    buf, pos = buf[pos:] + more, 0
                    continue
                yield Reject(
                    str(path),
                    line + buf.count("\n", pos, exc.pos),
                    f"invalid JSON: {exc.msg}; the rest of the file was not read",
                    buf[pos : pos + 2000],
                )
                return
            index += 1
            if isinstance(value, dict):
                yield Record(str(path), line, value)
            else:
                yield Reject(
                    str(path), line, f"a row must be a JSON object, got {_json_type(value)}", json.dumps(value)[:2000]
                )
            line += buf.count("\n", pos, end)
            pos, expect_comma = end, True
            if pos > JSON_CHUNK_CHARS:
                buf, pos = buf[pos:], 0
    except UnicodeDecodeError as exc:
        yield Reject(str(path), line, f"invalid UTF-8 near byte {exc.start}; the rest of the file was not read")


def _iter_json_object(path: Path, text: str, line: int) -> Iterator[Item]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield Reject(str(path), exc.lineno + line - 1, f"invalid JSON: {exc.msg} at column {exc.colno}", text[:2000])
        return
    lists = {key: value for key, value in data.items() if isinstance(value, list)}
    if len(lists) == 1 and all(isinstance(v, dict) for v in next(iter(lists.values()))):
        rows = next(iter(lists.values()))  # {"data": [{...}, ...]}
    elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
        rows = [dict(zip(lists, values)) for values in zip(*lists.values())]  # {"text": [...], "label": [...]}
    else:
        lengths = ", ".join(f"{k}: {len(v) if isinstance(v, list) else _json_type(v)}" for k, v in data.items())
        yield Reject(
            str(path), line, f"a JSON object must hold columns of equal length or one list of rows ({lengths})"
        )
        return
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict):
            yield Record(str(path), number, row)
        else:
            yield Reject(
                str(path), number, f"a row must be a JSON object, got {_json_type(row)}", json.dumps(row)[:2000]
            )


def iter_csv(path: Path, delimiter: str = ",") -> Iterator[Item]:
    """Rows of a CSV file with a header; a row with more or fewer fields than the header is rejected."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    bad_lines: dict[int, bytes] = {}

    def text_lines() -> Iterator[str]:
        for number, text, raw in _decoded_lines(path):
            if text is None:
                bad_lines[number] = raw
                text = raw.decode("utf-8", "replace")
            yield text

    reader = csv.reader(text_lines(), delimiter=delimiter)
    header: list[str] | None = None
    last_line = rows = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield Reject(str(path), reader.line_num, f"invalid CSV: {exc}")
            last_line = reader.line_num
            continue
        start, last_line = last_line + 1, reader.line_num
        if not values or (len(values) == 1 and not values[0].strip()):
            continue
        bad = [n for n in range(start, last_line + 1) if n in bad_lines]
        if header is None:
            if bad:
                raise DataError(f"{path}:{bad[0]}: the header row is not valid UTF-8; save the file as UTF-8")
            header = [name.strip() for name in values]
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise DataError(f"{path}:{start}: the header names a column twice ({', '.join(dupes)}); rename it")
            continue
        raw = delimiter.join(values)
        rows += 1
        if bad:
            yield Reject(str(path), start, _utf8_reason(bad_lines[bad[0]]), raw)
        elif len(values) != len(header):
            yield Reject(str(path), start, f"the row has {len(values)} fields, the header has {len(header)}", raw)
        else:
            yield Record(str(path), start, dict(zip(header, values)))
    if header is None:
        yield Reject(str(path), 0, "the file is empty")
    elif rows == 0:
        yield Reject(str(path), 0, "the file has a header but no rows")


def iter_tsv(path: Path) -> Iterator[Item]:
    return iter_csv(path, delimiter="\t")


def iter_parquet(path: Path) -> Iterator[Item]:
    """Parquet rows, read a batch of row groups at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot be read as Parquet: {exc}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield Record(str(path), number, row)
    if number == 0:
        yield Reject(str(path), 0, "the file has no rows")


def iter_text(path: Path, unit: str = "paragraph") -> Iterator[Item]:
    """Plain text as {"text": ...} rows: one per paragraph (blank-line separated), per line, or the whole file."""
    if unit == "file":
        content = path.read_bytes().removeprefix(BOM)
        try:
            document = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = content[: exc.start].count(b"\n") + 1
            yield Reject(
                str(path), line, f"invalid UTF-8 at line {line}; the file is one document, so all of it is rejected"
            )
            return
        if document.strip():
            yield Record(str(path), 1, {"text": document})
        else:
            yield Reject(str(path), 0, "the file is empty")
        return
    start, bad = 0, 0
    lines: list[str] = []
    seen_any = False
    for number, text, raw in _decoded_lines(path):
        blank = text is not None and not text.strip()
        if unit == "paragraph" and not blank:
            if not lines and not bad:
                start = number
            if text is None:
                bad = bad or number
            else:
                lines.append(text)
            continue
        if unit == "paragraph":
            if lines or bad:
                seen_any = True
                yield _paragraph(path, start, lines, bad)
            lines, bad = [], 0
            continue
        if text is None:  # unit == "line"
            seen_any = True
            yield Reject(str(path), number, _utf8_reason(raw), raw.decode("utf-8", "replace"))
        elif not blank:
            seen_any = True
            yield Record(str(path), number, {"text": text.rstrip("\r\n")})
    if lines or bad:
        seen_any = True
        yield _paragraph(path, start, lines, bad)
    if not seen_any:
        yield Reject(str(path), 0, "the file is empty")


def _paragraph(path: Path, start: int, lines: list[str], bad: int) -> Item:
    text = "".join(lines)
    if bad:
        return Reject(str(path), start, f"invalid UTF-8 at line {bad} (in the paragraph from line {start})", text)
    return Record(str(path), start, {"text": text})


def hf_split_names(path: Path) -> list[str] | None:
    """The split names of a saved DatasetDict, or None for a single saved Dataset."""
    marker = path / "dataset_dict.json"
    if not marker.is_file():
        return None
    return list(json.loads(marker.read_text(encoding="utf-8")).get("splits", []))


def iter_hf_dataset(path: Path, split: str | None = None) -> Iterator[Item]:
    """Rows of a dataset saved with `datasets`' save_to_disk; ClassLabel ids are turned into their names."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ... for damaged folders
        raise DataError(f"{path}: cannot be read as a saved Hugging Face dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            split = "train" if "train" in loaded else names[0]
        if split not in loaded:
            raise DataError(f"{path}: the dataset has no split '{split}' (it has {', '.join(names)})")
        loaded = loaded[split]
    name = f"{path}[{split}]" if split else str(path)
    decoders = {col: _label_decoder(feature) for col, feature in loaded.features.items()}
    decoders = {col: fn for col, fn in decoders.items() if fn is not None}
    number = 0
    for batch in loaded.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            number += 1
            row = dict(zip(columns, values))
            for col, decode in decoders.items():
                row[col] = decode(row[col])
            yield Record(name, number, row)
    if number == 0:
        yield Reject(name, 0, "the dataset has no rows")


def _label_decoder(feature: Any):
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return lambda value: feature.int2str(value) if isinstance(value, int) and value >= 0 else value
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return lambda values: (
            [inner.int2str(v) if isinstance(v, int) and v >= 0 else v for v in values]
            if isinstance(values, list)
            else values
        )
    return None
