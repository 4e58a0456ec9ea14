"""`afina prepare` end to end on planted problems: every row accounted for, exactly."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afina.config import CleanConfig, PiiConfig, load_recipe
from afina.data.clean import TextCleaner, luhn_valid, strip_html
from afina.data.load import DataError
from afina.data.prepare import assign_splits
from afina.pipeline import prepare
from afina.rundir import RunDir, file_sha256, read_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sentence(rng: random.Random, words: int = 40) -> str:
    """A text unlike any other drawn from the same generator (random made-up words)."""
    return " ".join(
        "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3)) for _ in range(words)
    )


def lines_of(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def recipe_for(tmp_path, tiny_model_dir, *overrides):
    return load_recipe(
        None, ["name=planted", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}", *overrides]
    )


def all_split_rows(recipe):
    run = RunDir(recipe.run_dir)
    return {name: read_jsonl(run.split_path(name)) for name in ("train", "validation", "test")}


def test_planted_problems_are_found_and_accounted_for_exactly(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    test_rows = [{"text": sentence(rng), "label": "pos" if i % 2 else "neg"} for i in range(10)]
    validation_rows = [{"text": sentence(rng), "label": "pos" if i % 2 else "neg"} for i in range(8)]
    validation_rows.append(dict(test_rows[0]))  # a validation row that is also in test: a leak out of validation
    clean = [{"text": sentence(rng), "label": "pos" if i % 2 else "neg"} for i in range(40)]
    train = list(clean)
    planted = {  # line number in train.jsonl -> (step, reason fragment)
    }

    def plant(row, step, reason):
        train.append(row)
        planted[len(train)] = (step, reason)

    plant(dict(clean[3]), "exact_dedup", "exact duplicate of")
    plant(
        {"text": "  " + clean[5]["text"].upper().replace(" ", "   ") + " ", "label": clean[5]["label"]},
        "exact_dedup",
        "exact duplicate of",
    )
    plant(
        {"text": clean[7]["text"], "label": "pos" if clean[7]["label"] == "neg" else "neg"},
        "exact_dedup",
        "which has label",
    )
    plant({"text": clean[9]["text"] + " zulu", "label": clean[9]["label"]}, "near_dedup", "near duplicate")
    plant({"text": "alpha " + clean[11]["text"], "label": clean[11]["label"]}, "near_dedup", "near duplicate")
    plant(dict(test_rows[2]), "leak", "exact duplicate of test row")
    plant(dict(validation_rows[1]), "leak", "exact duplicate of validation row")
    plant({"text": test_rows[4]["text"] + " again", "label": test_rows[4]["label"]}, "leak", "near duplicate")
    plant("{not json", "load", "invalid JSON")
    plant("[1, 2]", "load", "must be a JSON object")
    plant({"text": 5, "label": "pos"}, "map", "must be a string")
    plant({"text": "missing its label", "lbl": "pos"}, "map", "missing field")
    plant({"text": " \u200b\t ", "label": "neg"}, "clean", "empty after cleaning")
    plant({"text": sentence(rng, 400), "label": "pos"}, "length", "more than data.max_length=256")
    pii = [
        ("Write to jane.doe@example.com or ops@mail.example.org today " + sentence(rng, 10), 2, "email"),
        ("Call +1 (555) 123-4567 now " + sentence(rng, 10), 1, "phone"),
        ("Card 4111 1111 1111 1111 was charged " + sentence(rng, 10), 1, "card"),
        ("Server 192.168.10.20 is down " + sentence(rng, 10), 1, "ip"),
    ]
    for text, _, _ in pii:
        train.append({"text": text, "label": "neg"})
    not_pii = "Order 4111 1111 1111 1112 fails the Luhn check " + sentence(rng, 10)  # not a card number
    train.append({"text": not_pii, "label": "pos"})
    data = tmp_path / "train.jsonl"
    data.write_bytes(lines_of(train).encode() + b'{"text": "\xff\xfe", "label": "pos"}\n')
    planted[len(train) + 1] = ("load", "invalid UTF-8")
    (tmp_path / "validation.jsonl").write_text(lines_of(validation_rows), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(lines_of(test_rows), encoding="utf-8")
    before = {p.name: file_sha256(p) for p in tmp_path.glob("*.jsonl")}
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        f"data.path={data}",
        f"data.validation_path={tmp_path / 'validation.jsonl'}",
        f"data.test_path={tmp_path / 'test.jsonl'}",
        "data.max_length=256",
        "data.pii.redact=true",
        "data.split.train=1",
        "data.split.validation=0",
        "data.split.test=0",
    )

    report = prepare(recipe)

    assert {p.name: file_sha256(p) for p in tmp_path.glob("*.jsonl")} == before  # inputs untouched
    n_in = len(train) + 1 + len(validation_rows) + len(test_rows)
    assert report["rows_in"] == n_in == report["kept"] + report["rejected"]
    rejects = read_jsonl(RunDir(recipe.run_dir).data / "rejects.jsonl")
    assert len(rejects) == report["rejected"] == len(planted) + 1  # + the validation row that leaks into test
    train_rejects = {r["line"]: r for r in rejects if r["file"] == str(data)}
    assert set(train_rejects) == set(planted)
    for line, (step, fragment) in planted.items():
        assert train_rejects[line]["step"] == step and fragment in train_rejects[line]["reason"], (
            line,
            train_rejects[line],
        )
    [val_leak] = [r for r in rejects if r["file"].endswith("validation.jsonl")]
    assert (val_leak["line"], val_leak["step"]) == (
        len(validation_rows),
        "leak",
    ) and "removed from validation" in val_leak["reason"]

    expected_steps = Counter(step for step, _ in planted.values()) + Counter({"leak": 1})
    assert {s["step"]: s["rejected"] for s in report["steps"]} == {
        step: expected_steps.get(step, 0)
        for step in ("load", "map", "clean", "length", "exact_dedup", "near_dedup", "leak")
    }
    assert report["dedup"] == {"exact": 3, "near": 2, "near_threshold": 0.8, "leaks_removed": 4}
    assert report["cleaning"]["pii_redacted"] == {kind: n for _, n, kind in pii}
    assert report["truncation"]["rows_over_max_length"] == 1

    splits = all_split_rows(recipe)
    assert [r["text"] for r in splits["test"]] == [r["text"] for r in test_rows]
    assert len(splits["validation"]) == len(validation_rows) - 1
    assert len(splits["train"]) == len(clean) + len(pii) + 1
    texts = " ".join(r["text"] for r in splits["train"])
    assert (
        "[EMAIL]" in texts and "jane.doe" not in texts and "[CARD]" in texts and "[IP]" in texts and "[PHONE]" in texts
    )
    assert "4111 1111 1111 1112" in texts  # fails the Luhn check: not redacted
    assert report["labels"]["test"] == {"neg": 5, "pos": 5}
    html = (RunDir(recipe.run_dir).data / "report.html").read_text(encoding="utf-8")
    assert html.count("<img src='data:image/png;base64,") == 3 and "near duplicate" in html


def test_strict_stops_at_the_first_malformed_row_with_its_message(tmp_path, tiny_model_dir):
    data = tmp_path / "rows.csv"
    data.write_text("text,label\ngood,pos\nfine,neg\nragged,pos,extra\nlater,pos\n", encoding="utf-8")
    recipe = recipe_for(tmp_path, tiny_model_dir, f"data.path={data}")
    with pytest.raises(DataError, match=r"rows\.csv:4: the row has 3 fields, the header has 2 \(stopped by --strict"):
        prepare(recipe, strict=True)
    report = prepare(recipe)
    assert report["rejected"] == 1 and report["kept"] == 3


def test_single_class_label_is_a_warning_and_strict_error(tmp_path, tiny_model_dir):
    rng = random.Random(1)
    data = tmp_path / "rows.jsonl"
    data.write_text(lines_of([{"text": sentence(rng, 8), "label": "spam"} for _ in range(10)]), encoding="utf-8")
    recipe = recipe_for(tmp_path, tiny_model_dir, f"data.path={data}")
    report = prepare(recipe)
    assert any("every kept row has the label 'spam'" in w for w in report["warnings"])
    with pytest.raises(DataError, match="needs two classes"):
        prepare(recipe, strict=True)


def test_tagging_rows_are_checked(tmp_path, tiny_model_dir):
    data = tmp_path / "ner.jsonl"
    data.write_text(
        lines_of(
            [
                {"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]},
                {"tokens": ["Paris"], "tags": ["B-LOC", "O"]},
                {"tokens": ["Rome"], "tags": ["LOCATION"]},
                {"tokens": ["Oslo"], "tags": [3]},
                {"tokens": ["Bern", "is", "small"], "tags": ["B-LOC", "O", "O"]},
            ]
        ),
        encoding="utf-8",
    )
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        f"data.path={data}",
        "data.split.train=1",
        "data.split.validation=0",
        "data.split.test=0",
    )
    report = prepare(recipe)
    assert (
        report["schema"] == "tagging" and report["field_mapping"] == "tokens=tokens, tags=tags" and report["kept"] == 2
    )
    reasons = {r["line"]: r["reason"] for r in read_jsonl(RunDir(recipe.run_dir).data / "rejects.jsonl")}
    assert reasons == {
        2: "1 tokens but 2 tags; each token needs one tag",
        3: "tags[0] = 'LOCATION' is not a BIO tag (O, B-TYPE, I-TYPE)",
        4: "tags[0] must be a string, got int (integer tag ids: map them to names such as B-PER first)",
    }
    assert all_split_rows(recipe)["train"][0]["tokens"] == ["Ada", "Lovelace", "wrote"]


def test_raw_text_folder_and_html_stripping(tmp_path, tiny_model_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(
        "<p>Kettles &amp; pots</p><script>x()</script>\n\nSecond   paragraph.  \n", encoding="utf-8"
    )
    (folder / "b.md").write_text("Caf\u0065\u0301 notes\x07\n", encoding="utf-8")
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        f"data.path={folder}",
        "data.clean.strip_html=true",
        "data.split.train=1",
        "data.split.validation=0",
        "data.split.test=0",
    )
    report = prepare(recipe)
    assert report["schema"] == "text" and report["kept"] == 3
    texts = [r["text"] for r in all_split_rows(recipe)["train"]]
    assert texts == ["Kettles & pots", "Second   paragraph.", "Caf\u00e9 notes"]
    assert report["cleaning"]["rows_changed"] == {"html": 1, "unicode": 1, "control": 1, "whitespace": 3}


def test_group_aware_and_stratified_splits():
    labels = [("a" if i < 90 else "b") for i in range(100)]
    out = assign_splits(labels, [None] * 100, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=3)
    per_split = {s: Counter(l for l, o in zip(labels, out) if o == s) for s in ("train", "validation", "test")}
    assert per_split == {"train": {"a": 72, "b": 8}, "validation": {"a": 9, "b": 1}, "test": {"a": 9, "b": 1}}
    groups = [f"doc{i // 7}" for i in range(100)]
    out = assign_splits(labels, groups, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=3)
    for group in set(groups):
        assert len({o for o, g in zip(out, groups) if g == group}) == 1  # a group never straddles splits
    assert 70 <= Counter(out)["train"] <= 86 and Counter(out)["test"] > 0 and Counter(out)["validation"] > 0
    assert assign_splits(labels, groups, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=3) == out


def test_pii_and_html_helpers():
    cleaner = TextCleaner(CleanConfig(), PiiConfig(redact=True))
    text = cleaner.clean_text("ip 2001:db8::1, at 10:30:00, in 2019-2020, tel 020 7946 0958, id 12345678901")
    assert text == "ip [IP], at 10:30:00, in 2019-2020, tel [PHONE], id 12345678901"
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert strip_html("<div>a<br>b</div><style>p{}</style>&lt;tag&gt;").strip() == "a\nb\n<tag>"


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    rows=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"text": st.text(max_size=30), "label": st.sampled_from(["a", "b", "", 3, None, 1.5])}
            ),
            st.dictionaries(
                st.sampled_from(["text", "label", "x"]),
                st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), max_size=2)),
                max_size=3,
            ),
            st.text(alphabet='{}[]":,ab \x00', max_size=15),
        ),
        min_size=1,
        max_size=15,
    )
)
def test_prepare_never_crashes_and_rows_in_equal_kept_plus_rejected(tmp_path_factory, tiny_model_dir, rows):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    data = tmp_path / "rows.jsonl"
    data.write_text(lines_of([{"text": "anchor row", "label": "a"}] + rows), encoding="utf-8")
    recipe = recipe_for(tmp_path, tiny_model_dir, f"data.path={data}", "data.schema=classification")
    try:
        report = prepare(recipe)
    except DataError as exc:
        pytest.fail(f"prepare failed on an input with one good row: {exc}")
    rejects = read_jsonl(RunDir(recipe.run_dir).data / "rejects.jsonl")
    kept = sum(len(rows) for rows in all_split_rows(recipe).values())
    assert report["rows_in"] == kept + len(rejects) == report["kept"] + report["rejected"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_shared_ner_file_guesses_tagging(tmp_path, tiny_model_dir):
    subset = tmp_path / "ner.jsonl"
    with open(SHARED_DATA / "ner_wikiann_en_train3k.jsonl", encoding="utf-8") as fh:
        subset.write_text("".join(line for _, line in zip(range(300), fh)), encoding="utf-8")
    report = prepare(recipe_for(tmp_path, tiny_model_dir, f"data.path={subset}"))
    assert report["schema"] == "tagging" and report["rows_in"] == 300 == report["kept"] + report["rejected"]
