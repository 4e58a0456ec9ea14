"""Classification (generative labels with constrained prediction, and a head) on the tiny Llama."""

import json
import random

import pytest
import torch

from afina.config import load_recipe
from afina.data.format import encode_chat
from afina.device import autocast_factory
from afina.models import load_model
from afina.pipeline import prepare, train
from afina.rundir import RunDir, read_jsonl
from afina.tasks import classification
from conftest import write_jsonl

FP32 = autocast_factory("fp32", torch.device("cpu"))


def sentiment_rows(n=60, seed=0):
    """Synthetic two-class data whose label is told by one word in the middle of the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("good", "bad")[i % 2]
        word = rng.choice(("great", "fine", "lovely") if label == "good" else ("awful", "poor", "grim"))
        rows.append({"text": f"the film was {word} said reviewer {i}", "label": label})
    return rows


def make_recipe(tmp_path, model_dir, *overrides, rows=None):
    data = write_jsonl(tmp_path / "reviews.jsonl", rows if rows is not None else sentiment_rows())
    return load_recipe(
        None,
        [
            "name=cls",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={model_dir}",
            f"data.path={data}",
            "task=classification",
            "data.dedup.near=false",
            "training.batch_size=8",
            "training.max_steps=8",
            "training.learning_rate=0.01",
            "training.precision=fp32",
            "training.report_to=[]",
            "training.plots=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory, tiny_model_dir):
    recipe = make_recipe(tmp_path_factory.mktemp("gen"), tiny_model_dir, "classification.mode=generative")
    prepare(recipe)
    summary = train(recipe, progress=False)
    return recipe, summary, classification.evaluate(recipe, progress=False)


def test_generative_classification_trains_and_reports_label_metrics(generative_run):
    recipe, summary, report = generative_run
    run = RunDir(recipe.run_dir)
    assert summary["task"] == "classification" and summary["mode"] == "generative" and summary["labels"] == 2
    assert json.loads((run.root / "labels.json").read_text())["labels"] == ["bad", "good"]
    assert json.loads((run.adapter / "labels.json").read_text())["labels"] == ["bad", "good"]
    assert list(report["systems"]) == ["base", "tuned"]
    test_rows = read_jsonl(run.split_path("test"))
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    for system, scores in report["systems"].items():
        mine = [p for p in predictions if p["system"] == system]
        assert len(mine) == len(test_rows) == report["test_examples"]
        # Decoding is constrained: every prediction is a label, never free text.
        assert {p["prediction"] for p in mine} <= {"bad", "good"}
        assert scores["accuracy"] == pytest.approx(100.0 * sum(p["correct"] for p in mine) / len(mine), abs=1e-3)
        matrix = scores["confusion"]["matrix"]
        assert scores["confusion"]["labels"] == ["bad", "good"]
        assert sum(map(sum, matrix)) == len(mine)
        assert sum(matrix[0]) == sum(r["label"] == "bad" for r in test_rows)  # rows are references
        assert set(scores["per_class"]) <= {"bad", "good"} and "macro_f1" in scores
    saved = json.loads((run.eval / "metrics.json").read_text())
    assert saved["systems"]["tuned"]["accuracy"] == report["systems"]["tuned"]["accuracy"]
    page = (run.eval / "report.html").read_text()
    assert "Confusion matrices" in page and "Per class" in page


def test_label_scores_are_the_label_sequence_log_probability(tiny_model_dir, tokenizer):
    """score_rows' number for a label is log P(label tokens + end of turn | prompt), computed directly."""
    recipe = load_recipe(None, ["task=classification"])
    model = load_model(str(tiny_model_dir))
    rows = [{"text": "the film was lovely"}, {"text": "a grim and poor film overall"}]
    labels = ["bad", "good", "not sure"]
    scored = classification.score_rows(model, tokenizer, rows, labels, recipe, FP32, batch_size=4)
    for row, result in zip(rows, scored):
        for label in labels:
            example = encode_chat(
                tokenizer,
                classification.prompt_messages(row["text"], labels, recipe) + [{"role": "assistant", "content": label}],
            )
            ids = torch.tensor([example["input_ids"]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = torch.tensor(example["input_ids"][1:])
            mask = torch.tensor(example["labels"][1:]) != -100
            expected = float(logprobs[torch.arange(len(targets)), targets][mask].sum())
            assert result["label_logprobs"][label] == pytest.approx(expected, abs=1e-3)
        assert result["predicted_label"] == max(labels, key=result["label_logprobs"].get)
        assert 0 < result["label_probability"] <= 1


def test_answer_logprobs_equal_whole_sequence_scores_for_any_group(tiny_model_dir, tokenizer):
    """Groups of answers to one prompt (3 and 5 choices, as a forgetting probe's questions have) run the prompt
    once; a group whose examples do not share a prompt is scored whole; both give label_logprobs' numbers."""
    from afina.train.loss import answer_logprobs, label_logprobs

    model = load_model(str(tiny_model_dir))

    def chat(question, answer):
        return encode_chat(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])

    groups = [
        [chat("Which is a colour?", a) for a in ("red", "seven", "a very long answer indeed")],
        [chat("Count to three, please, in words", a) for a in ("one two three", "1", "uno", "eins zwei", "x")],
        [chat("Which is a colour?", "blue"), chat("A different question here", "blue")],  # no shared prompt
    ]
    scores = answer_logprobs(model, groups, tokenizer.pad_token_id, 2, FP32)
    whole = label_logprobs(model, [e for g in groups for e in g], tokenizer.pad_token_id, 4, FP32)
    assert [len(s) for s in scores] == [3, 5, 2]
    assert [v for s in scores for v in s] == pytest.approx(whole, abs=1e-3)


def test_test_label_never_seen_in_training_is_an_error_or_skipped_with_reason(generative_run):
    recipe, _, _ = generative_run
    run = RunDir(recipe.run_dir)
    test_path = run.split_path("test")
    original = test_path.read_text()
    rows = read_jsonl(test_path)
    rows[0]["label"] = "meh"
    write_jsonl(test_path, rows)
    try:
        with pytest.raises(
            classification.LabelError, match=r"1 test row\(s\) have label\(s\) training never saw: 'meh'"
        ):
            classification.evaluate(recipe, progress=False)
        recipe.classification.unseen_test_labels = "skip"
        recipe.eval.systems = ["tuned"]
        report = classification.evaluate(recipe, progress=False)
        assert report["test_examples"] == len(rows) - 1 and report["skipped_unseen_labels"] == 1
        (reject,) = read_jsonl(run.eval / "rejects.jsonl")
        assert reject["label"] == "meh" and "never seen in training" in reject["reason"]
    finally:
        test_path.write_text(original)


def test_empty_or_single_class_is_an_error(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, "classification.labels=[bad, good, neutral]")
    prepare(recipe)
    with pytest.raises(classification.LabelError, match="'neutral' have no rows in the train split"):
        train(recipe, progress=False)
    rows = [dict(r, label="good") for r in sentiment_rows(20)]
    (tmp_path / "one").mkdir()
    recipe = make_recipe(tmp_path / "one", tiny_model_dir, rows=rows)
    prepare(recipe)
    with pytest.raises(classification.LabelError, match="a classifier needs two or more"):
        train(recipe, progress=False)


def test_head_classifier_learns_and_predict_writes_rows_with_labels(tmp_path, tiny_model_dir):
    from afina.cli import main

    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        "classification.mode=head",
        "training.max_steps=24",
        "classification.head_learning_rate=0.02",
        "eval.report=false",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    assert summary["mode"] == "head" and summary["backbone"] == "llm" and summary["method"] == "lora"
    # LoRA + the head train; the head is saved with the adapter (peft modules_to_save).
    assert json.loads((run.adapter / "head.json").read_text())["labels"] == ["bad", "good"]
    report = classification.evaluate(recipe, progress=False)
    assert list(report["systems"]) == ["tuned"]
    assert report["systems"]["tuned"]["accuracy"] >= 75.0  # one sentiment word decides the label; chance is 50

    rows = [
        {"id": 1, "text": "the film was lovely said reviewer 999"},
        {"id": 2, "sentence": "the film was grim said reviewer 998"},
    ]
    source = write_jsonl(tmp_path / "new.jsonl", rows)
    out = tmp_path / "predicted.jsonl"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("{}\n")
    args = [
        str(recipe_file),
        "name=cls",
        f"output_dir={tmp_path / 'runs'}",
        f"model.name={tiny_model_dir}",
        "task=classification",
        "classification.mode=head",
        "--input",
        str(source),
        "--output",
        str(out),
    ]
    assert main(["predict", *args]) == 0
    predicted = read_jsonl(out)
    assert [{k: p[k] for k in r} for p, r in zip(predicted, rows)] == rows  # the input rows, untouched
    assert all(p["predicted_label"] in ("bad", "good") and 0.5 <= p["label_probability"] <= 1 for p in predicted)
    # The same texts through evaluation's path give the same labels.
    model, tokenizer, labels = classification.load_classifier(recipe, run, torch.device("cpu"))
    direct = classification.head_predict(
        model, tokenizer, [{"text": r.get("text", r.get("sentence"))} for r in rows], labels, FP32
    )
    assert [d["predicted_label"] for d in direct] == [p["predicted_label"] for p in predicted]
    (tmp_path / "bad.jsonl").write_text('{"title": "no text here"}\n')
    assert (
        main(["predict", *args[:-4], "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "x.jsonl")])
        == 2
    )


def test_last_layers_puts_adapters_on_the_top_layers_only(tiny_model_dir):
    from afina.config import MethodConfig
    from afina.train.methods import apply_method

    model = apply_method(load_model(str(tiny_model_dir)), MethodConfig(last_layers=1))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.1." in n for n in trained)
    assert {n.split(".")[-2] for n in trained} == {"default"} and any("down_proj" in n for n in trained)


def test_max_minutes_stops_training_and_saves_the_result(tmp_path, tiny_model_dir):
    recipe = make_recipe(
        tmp_path, tiny_model_dir, "classification.mode=head", "training.max_steps=500", "training.max_minutes=0.0001"
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["steps"] == 1 and summary["stopped"].startswith("time limit")
    assert summary["best_step"] == 1  # validated before stopping, so the last weights are the result
    assert (RunDir(recipe.run_dir).adapter / "head.json").is_file()


def test_sequence_loss_matches_transformers_and_skips_rows_outside_the_label_set(tiny_model_dir, tokenizer):
    from afina.models import load_head_model
    from afina.train.batches import pad_batch
    from afina.train.loss import count_sequences, sequence_label_loss

    model = load_head_model(str(tiny_model_dir), "sequence", ["bad", "good", "meh"], tokenizer.pad_token_id)
    rows = [{"text": "a lovely film"}, {"text": "grim, and far too long for what it is"}, {"text": "fine"}]
    examples = classification.encode_for_head(
        tokenizer, [dict(r, label=label) for r, label in zip(rows, ["good", "bad", "meh"])], ["bad", "good", "meh"]
    )
    batch = pad_batch(examples, tokenizer.pad_token_id)  # right padding: the head pools the last real token
    loss_sum, n = sequence_label_loss(model, **batch)
    with torch.no_grad():
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"][:, 0]
        ).loss
    assert n == 3 == count_sequences([batch])
    assert float(loss_sum.detach()) / n == pytest.approx(float(reference), abs=1e-5)
    unknown = classification.encode_for_head(
        tokenizer, [dict(rows[0], label="good"), dict(rows[1], label="other")], ["bad", "good", "meh"]
    )
    batch = pad_batch(unknown, tokenizer.pad_token_id)
    loss_sum, n = sequence_label_loss(model, **batch)
    assert n == 1 == count_sequences([batch])


def test_a_zero_shot_preference_for_the_first_listed_label_is_calibrated_away():
    """A classifier that adds 3 nats to whichever label the instruction lists first (as TweetEval's base model
    did: 'negative' for 93% of tweets) and 1.5 nats to the right one: raw, it answers the first label for
    every row; calibrated on its own content-free prior, its answers follow the rows' labels, in about their
    proportions (the label prior), and mostly right."""
    import random

    labels = ["negative", "neutral", "positive"]
    rng = random.Random(0)
    truth = [rng.choice(labels) for _ in range(300)]
    bias = {"negative": 3.0, "neutral": 0.0, "positive": 0.4}

    def scores(right: str | None) -> dict:
        raw = {label: bias[label] + (1.5 if label == right else 0.0) + rng.gauss(0, 0.3) for label in labels}
        return {"predicted_label": max(raw, key=raw.get), "label_probability": 0.0, "label_logprobs": raw}

    predicted = [scores(label) for label in truth]
    assert sum(p["predicted_label"] == "negative" for p in predicted) > 0.9 * len(truth)
    content_free = [scores(None) for _ in classification.CONTENT_FREE]
    prior = torch.stack(
        [torch.softmax(torch.tensor(list(s["label_logprobs"].values())), dim=-1) for s in content_free]
    ).mean(dim=0)
    fixed = classification.calibrated(predicted, dict(zip(labels, prior.tolist())))
    for label in labels:
        share = sum(p["predicted_label"] == label for p in fixed) / len(fixed)
        assert share == pytest.approx(truth.count(label) / len(truth), abs=0.1)
    assert sum(p["predicted_label"] == t for p, t in zip(fixed, truth)) > 0.8 * len(truth)
    assert all(p["label_logprobs"] == q["label_logprobs"] for p, q in zip(fixed, predicted))  # raw scores kept


def test_the_base_row_is_calibrated_and_says_so(generative_run):
    _, _, report = generative_run
    prior = report["calibration"]["base"]["prior"]
    assert report["calibration"]["base"]["method"] == "contextual" and set(prior) == {"bad", "good"}
    assert sum(prior.values()) == pytest.approx(1.0, abs=1e-4)
    assert "tuned" not in report["calibration"]
