"""Loaders: every container and every kind of bad input, with file and line; property tests on malformed input."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afina.data.load import DataError, Record, Reject, iter_source


def items(path: Path, **kwargs):
    out = list(iter_source(path, **kwargs))
    return [i for i in out if isinstance(i, Record)], [i for i in out if isinstance(i, Reject)]


def test_jsonl_with_bom_crlf_and_bad_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{broken\r\n[1]\r\n{"text": "\xff"}\r\n{"text": "b"}')
    records, rejects = items(path)
    assert [(r.line, r.row["text"]) for r in records] == [(1, "a"), (6, "b")]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (3, "invalid JSON"),
        (4, "a row must be a JSON object, got an array"),
        (5, "invalid UTF-8 at byte 10 of the line"),
    ]
    assert all(r.file == str(path) for r in rejects)


def test_json_array_is_streamed_with_line_numbers(tmp_path, monkeypatch):
    import afina.data.load as load

    monkeypatch.setattr(load, "JSON_CHUNK_CHARS", 7)  # elements cut across many chunk boundaries
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "first row"},\n  "oops",\n  {"text": "third\\nrow"}\n]\n', encoding="utf-8")
    records, rejects = items(path)
    assert [(r.line, r.row["text"]) for r in records] == [(2, "first row"), (4, "third\nrow")]
    assert [(r.line, r.reason) for r in rejects] == [(3, "a row must be a JSON object, got a string")]


def test_json_syntax_error_stops_the_file_as_one_reject(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"text": "ok"},\n {"text": oops},\n {"text": "never read"}]', encoding="utf-8")
    records, rejects = items(path)
    assert len(records) == 1 and len(rejects) == 1
    assert rejects[0].line == 2 and "invalid JSON" in rejects[0].reason and "rest of the file" in rejects[0].reason


def test_json_object_of_columns_and_of_one_list(tmp_path):
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"text": ["x", "y"], "label": ["p", "n"]}), encoding="utf-8")
    assert [r.row for r in items(columns)[0]] == [{"text": "x", "label": "p"}, {"text": "y", "label": "n"}]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "x"}, {"text": "y"}]}), encoding="utf-8")
    assert [r.row["text"] for r in items(wrapped)[0]] == ["x", "y"]
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"text": ["x", "y"], "label": ["p"]}), encoding="utf-8")
    records, rejects = items(ragged)
    assert not records and "equal length" in rejects[0].reason


def test_csv_ragged_rows_quotes_bom_crlf_and_bad_utf8(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b'\xef\xbb\xbftext,label\r\n"hello, world",pos\r\n"two\nlines",neg\r\nragged,a,b\r\n'
        b"short\r\n\xff,x\r\nlast,neg\r\n"
    )
    records, rejects = items(path)
    assert [(r.line, r.row) for r in records] == [
        (2, {"text": "hello, world", "label": "pos"}),
        (3, {"text": "two\nlines", "label": "neg"}),
        (8, {"text": "last", "label": "neg"}),
    ]
    assert [(r.line, r.reason) for r in rejects] == [
        (5, "the row has 3 fields, the header has 2"),
        (6, "the row has 1 fields, the header has 2"),
        (7, "invalid UTF-8 at byte 0 of the line"),
    ]


def test_tsv_and_duplicate_header(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text('tokens\ttags\n["A", "b"]\t["B-PER", "O"]\n', encoding="utf-8")
    assert items(path)[0][0].row == {"tokens": '["A", "b"]', "tags": '["B-PER", "O"]'}
    bad = tmp_path / "dupe.csv"
    bad.write_text("text,text\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dupe\.csv:1: the header names a column twice \(text\)"):
        items(bad)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(10_000)], "label": [i % 3 for i in range(10_000)]}),
        path,
        row_group_size=1000,
    )
    records, rejects = items(path)
    assert len(records) == 10_000 and not rejects
    assert (records[-1].line, records[-1].row) == (10_000, {"text": "row 9999", "label": 0})
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot be read as Parquet"):
        items(broken)


@pytest.mark.parametrize(
    "unit, expected",
    [
        ("paragraph", [(1, "Para one\nstill one\n"), (4, "Para two\n")]),
        ("line", [(1, "Para one"), (2, "still one"), (4, "Para two")]),
        ("file", [(1, "Para one\nstill one\n\nPara two\n")]),
    ],
)
def test_plain_text_units(tmp_path, unit, expected):
    path = tmp_path / "doc.txt"
    path.write_text("Para one\nstill one\n\nPara two\n", encoding="utf-8")
    records, rejects = items(path, text_unit=unit)
    assert [(r.line, r.row["text"]) for r in records] == expected and not rejects


def test_text_paragraph_with_bad_utf8_is_rejected_whole(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"good one\n\nbad \xff here\nsame para\n\nlast\n")
    records, rejects = items(path)
    assert [r.row["text"] for r in records] == ["good one\n", "last\n"]
    assert [(r.line, r.reason) for r in rejects] == [(3, "invalid UTF-8 at line 3 (in the paragraph from line 3)")]


def test_folder_of_mixed_files_and_empty_files(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (folder / "sub" / "b.csv").write_text("text\nb\n", encoding="utf-8")
    (folder / "c.txt").write_text("c\n", encoding="utf-8")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "notes.docx").write_bytes(b"PK")
    (folder / ".hidden.jsonl").write_text("{}\n", encoding="utf-8")
    records, rejects = items(folder)
    assert [r.row["text"] for r in records] == ["a", "c\n", "b"]
    assert [(Path(r.file).name, r.line, r.reason.split(";")[0]) for r in rejects] == [
        ("empty.jsonl", 0, "the file is empty"),
        ("notes.docx", 0, "skipped: unsupported file type '.docx' in a data folder"),
    ]


def test_hf_dataset_on_disk_with_class_labels(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
        }
    )
    split = datasets.Dataset.from_dict(
        {"tokens": [["Ada", "Lovelace"], ["hi"]], "ner_tags": [[1, 2], [0]], "label": [1, 0]}, features=features
    )
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    records, rejects = items(tmp_path / "hf", hf_split="test")
    assert records[0].row == {"tokens": ["Ada", "Lovelace"], "ner_tags": ["B-PER", "I-PER"], "label": "pos"}
    assert records[0].file.endswith("hf[test]") and records[1].line == 2 and not rejects


def test_unreadable_inputs_are_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.jsonl: data file not found"):
        items(tmp_path / "absent.jsonl")
    odd = tmp_path / "rows.xyz"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.xyz: cannot tell the file format.*data\.format"):
        items(odd)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        items(tmp_path / "nothing")


# Lines that are valid, broken or hostile JSON, including bytes that are not UTF-8.
json_lines = st.one_of(
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=3),
    ),
    st.builds(
        lambda v: json.dumps(v).encode(),
        st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=10), st.integers()),
    ),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.text(alphabet='{}[]":,ab \t\x00é\ufeff', max_size=30).map(lambda s: s.encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(json_lines, max_size=12), bom=st.booleans(), crlf=st.booleans())
def test_jsonl_loader_never_crashes_and_accounts_for_every_line(tmp_path, lines, bom, crlf):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(
        (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
    )

    def is_blank(raw: bytes) -> bool:
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False

    out = list(iter_source(path))
    # The BOM is dropped before line 1; a first line that itself starts with BOM bytes (and no
    # file BOM) is indistinguishable from a file BOM, so it loses them too.
    if lines and not bom and lines[0].startswith(b"\xef\xbb\xbf"):
        lines = [lines[0][3:], *lines[1:]]
    content_lines = [line for line in lines if not is_blank(line)]
    assert all(isinstance(item, (Record, Reject)) for item in out)
    if content_lines:
        assert len(out) == len(content_lines)  # one row or one reject per line that is not blank
    else:
        assert [(r.line, r.reason) for r in out] == [(0, "the file is empty")]


csv_cells = st.text(alphabet='ab,"\n\r\t é', max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(csv_cells, min_size=1, max_size=4), max_size=8), junk=st.binary(max_size=6))
def test_csv_loader_never_crashes(tmp_path, rows, junk):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(b"text,label\n" + "\n".join(",".join(r) for r in rows).encode() + junk)
    for item in iter_source(path):
        assert isinstance(item, (Record, Reject))
        if isinstance(item, Record):
            assert set(item.row) == {"text", "label"}
        else:
            assert item.line >= 0 and item.reason
