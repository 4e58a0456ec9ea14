import json

import pytest

from afina.data.format import IGNORE_INDEX, encode_chat, render_prompt
from afina.data.load import DataError
from afina.data.prepare import split_counts
from afina.pipeline import prepare
from afina.rundir import RunDir, file_sha256, read_jsonl
from conftest import SYSTEM, support_rows, write_jsonl

CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "When do you open?"},
    {"role": "assistant", "content": "We open at 7:40 a.m."},
    {"role": "user", "content": "And close?"},
    {"role": "assistant", "content": "At 3:20 p.m."},
]


def labelled_text(tokenizer, encoded):
    return tokenizer.decode([t for t, l in zip(encoded["input_ids"], encoded["labels"]) if l != IGNORE_INDEX])


def test_loss_mask_covers_assistant_turns_only(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    assert labelled_text(tokenizer, encoded) == "We open at 7:40 a.m.<|im_end|>At 3:20 p.m.<|im_end|>"


def test_train_on_all_labels_every_token(tokenizer):
    encoded = encode_chat(tokenizer, CHAT, train_on="all")
    assert encoded["labels"] == encoded["input_ids"]


def test_training_text_matches_inference_rendering(tokenizer):
    """The prompt the model sees when served is exactly the start of what it was trained on."""
    encoded = encode_chat(tokenizer, CHAT[:3])
    prompt_ids = tokenizer(render_prompt(tokenizer, CHAT[:2]), add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in encoded["labels"][: len(prompt_ids)])
    assert encoded["labels"][len(prompt_ids)] != IGNORE_INDEX  # the first answer token is learned


def test_split_counts_add_up():
    for n in (1, 2, 3, 10, 241):
        counts = split_counts(n, {"train": 0.7, "validation": 0.1, "test": 0.2})
        assert sum(counts.values()) == n
    assert split_counts(240, {"train": 0.7, "validation": 0.1, "test": 0.2}) == {
        "train": 168,
        "validation": 24,
        "test": 48,
    }


def test_prepare_rejects_bad_rows_with_line_and_reason(tiny_recipe, tmp_path):
    good = support_rows(3, 4)
    lines = [json.dumps(r) for r in good]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"messages": [{"role": "user", "content": "hi"}]}))  # no answer
    lines.insert(
        6, json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    )
    lines.insert(8, json.dumps({"messages": "text"}))
    lines.append(json.dumps(good[0]))  # exact duplicate
    lines.append("[1, 2]")
    lines.append(
        json.dumps({"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]})
    )
    recipe = tiny_recipe("data.max_length=128")
    source = write_jsonl(tmp_path / "support.jsonl", lines)
    source.write_bytes(b"\xef\xbb\xbf" + source.read_bytes() + b'{"messages": "\xff"}\n')
    before = file_sha256(source)

    report = prepare(recipe)

    assert file_sha256(source) == before  # the user's file is never modified
    run = RunDir(recipe.run_dir)
    rejects = read_jsonl(run.data / "rejects.jsonl")
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert report["rows_in"] == len(lines) + 1 == report["kept"] + report["rejected"]
    assert report["kept"] == len(good)
    assert "invalid JSON" in reasons[3]
    assert "last message must be the assistant" in reasons[5]
    assert "role must be one of" in reasons[7]
    assert "must be a non-empty list" in reasons[9]
    assert reasons[len(good) + 5].startswith(f"exact duplicate of {source}:1")
    assert "JSON object" in reasons[len(good) + 6]
    assert "more than data.max_length=128" in reasons[len(good) + 7]
    assert "invalid UTF-8" in reasons[len(good) + 8]
    assert all(r["file"] == str(source) for r in rejects)
    splits = {name: read_jsonl(run.split_path(name)) for name in ("train", "validation", "test")}
    assert sum(len(rows) for rows in splits.values()) == report["kept"]
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(set(ids)) == len(ids)
    manifest = run.read_manifest()
    assert manifest["data"]["source_sha256"] == before and len(manifest["data"]["chat_template_sha256"]) == 64


def test_strict_stops_at_first_bad_row(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.max_length=128")
    write_jsonl(tmp_path / "support.jsonl", [json.dumps(r) for r in support_rows(2, 2)] + ["{oops"])
    with pytest.raises(DataError, match=r"support\.jsonl:5: invalid JSON"):
        prepare(recipe, strict=True)


def test_split_is_seeded(tiny_recipe):
    recipe = tiny_recipe()
    prepare(recipe)
    first = read_jsonl(RunDir(recipe.run_dir).split_path("test"))
    prepare(recipe)
    assert read_jsonl(RunDir(recipe.run_dir).split_path("test")) == first
    prepare(tiny_recipe("seed=7"))
    assert read_jsonl(RunDir(recipe.run_dir).split_path("test")) != first


@pytest.mark.parametrize(
    "row, fields, schema",
    [
        ({"prompt": "Hi?", "completion": "Hello."}, [], "prompt_completion"),
        ({"instruction": "Add", "input": "2 and 3", "output": "5"}, [], "instruction"),
        ({"instruction": "Name a fruit", "context": "", "response": "Apple"}, [], "instruction"),
        (
            {"question": "Hi?", "answer": "Hello."},
            ["data.fields.prompt=question", "data.fields.completion=answer"],
            "prompt_completion",
        ),
    ],
)
def test_schemas_are_guessed_or_mapped(tiny_recipe, row, fields, schema):
    recipe = tiny_recipe(
        "data.system_prompt=Be brief.",
        *fields,
        rows=[row] * 1 + [{**row, **{k: v + " again" for k, v in row.items() if v}}],
    )
    report = prepare(recipe)
    assert report["schema"] == schema and report["kept"] == 2
    rows = [r for s in ("train", "validation", "test") for r in read_jsonl(RunDir(recipe.run_dir).split_path(s))]
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[0]["messages"][-1]["role"] == "assistant"


def test_unknown_schema_is_explained(tiny_recipe):
    recipe = tiny_recipe(rows=[{"foo": "bar"}])
    with pytest.raises(DataError, match="cannot tell the schema.*data.fields"):
        prepare(recipe)


def test_empty_and_missing_files(tiny_recipe, tmp_path):
    recipe = tiny_recipe(rows=[])
    with pytest.raises(DataError, match="no usable rows.*the file is empty"):
        prepare(recipe)
    with pytest.raises(DataError, match="not found"):
        prepare(tiny_recipe(f"data.path={tmp_path / 'absent.jsonl'}"))
