"""Fixes found on data afina had never seen (issue 20): each case fails the way a user met it before the fix."""

import json
import random

import pytest

from afina.config import RecipeError, load_recipe
from afina.pipeline import prepare, run_stage, train
from afina.rundir import RunDir
from conftest import write_jsonl


def labelled_rows(n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("good", "bad")[i % 2]
        word = rng.choice(("great", "fine") if label == "good" else ("awful", "poor"))
        rows.append({"text": f"the film was {word} said reviewer {i}", "label": label})
    return rows


def recipe_for(tmp_path, model_dir, *overrides, rows=None, name="first"):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else labelled_rows())
    return load_recipe(
        None,
        [
            f"name={name}",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={model_dir}",
            f"data.path={data}",
            "data.dedup.near=false",
            "training.batch_size=8",
            "training.max_steps=2",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            "eval.report=false",
            *overrides,
        ],
    )


# ---- 1. classification data without `task:` ----------------------------------------------------


def test_classification_data_without_task_trains_a_classifier_and_says_so(tmp_path, tiny_model_dir):
    recipe = recipe_for(tmp_path, tiny_model_dir)
    assert recipe.task == "chat"  # nothing named
    lines: list[str] = []
    report = run_stage("prepare", recipe, lines.append)
    assert report["schema"] == "classification"
    assert recipe.task == "classification"
    assert any("task: classification (inferred" in line for line in lines)
    # A fresh process (`afina train recipe.yaml`) reads the same recipe without a task: the run's data decides.
    again = recipe_for(tmp_path, tiny_model_dir)
    lines.clear()
    summary = run_stage("train", again, lines.append)
    assert summary["task"] == "classification" and summary["labels"] == 2
    assert any("inferred" in line for line in lines)
    assert json.loads((RunDir(again.run_dir).root / "labels.json").read_text())["labels"] == ["bad", "good"]


def test_task_chat_on_classification_data_is_refused_with_the_fix(tmp_path, tiny_model_dir):
    recipe = recipe_for(tmp_path, tiny_model_dir, "task=chat")
    prepare(recipe)
    assert recipe.task == "chat"  # named by the user: kept, and refused below
    with pytest.raises(RecipeError, match="Set task: classification"):
        train(recipe, progress=False)
    with pytest.raises(RecipeError, match="task: classification"):
        run_stage("eval", recipe, lambda line: None)


def test_chat_eval_on_rows_without_messages_is_a_clear_error(tmp_path, tiny_model_dir):
    from afina.tasks import chat

    rows = [{"text": f"plain document number {i} about kettles and filters"} for i in range(12)]
    recipe = recipe_for(tmp_path, tiny_model_dir, rows=rows, name="plain")
    prepare(recipe)
    with pytest.raises(RecipeError, match="answers chat turns"):
        chat.chat_eval(recipe)


# ---- 2. a recipe that does not say how long to train ---------------------------------------------


def test_no_length_given_trains_until_validation_stops_improving(tmp_path, tiny_model_dir):
    from afina.config import AUTO_EPOCHS, AUTO_PATIENCE, load_recipe

    unset = load_recipe(None, []).training
    assert unset.until_converged() and unset.epoch_limit() == AUTO_EPOCHS and unset.patience() == AUTO_PATIENCE
    given = load_recipe(None, ["training.epochs=2"]).training
    assert not given.until_converged() and given.epoch_limit() == 2 and given.patience() is None
    assert load_recipe(None, ["training.max_steps=5"]).training.patience() is None
    from afina.pipeline import quickstart_recipe

    assert quickstart_recipe([]).training.epochs == 6  # the quickstart says how long: its time is unchanged

    # A learning rate far too high: validation gets worse at once, and the run stops after AUTO_PATIENCE
    # validations without a better loss instead of running on to the epoch cap.
    recipe = recipe_for(
        tmp_path, tiny_model_dir, "training.max_steps=null", "training.learning_rate=0.5", "task=classification"
    )
    assert recipe.training.until_converged()
    prepare(recipe)
    lines: list[str] = []
    summary = run_stage("train", recipe, lines.append)
    assert summary["stopped"].startswith("early stopping")
    assert summary["epochs"] < AUTO_EPOCHS
    assert "until validation stopped improving" in summary["length"]
    assert any("until validation stopped improving" in line for line in lines)


# ---- 4. a length limit that drops much of the data ------------------------------------------------


def test_prepare_says_loudly_what_max_length_would_keep_95_percent(tmp_path, tiny_model_dir):
    from afina.data.prepare import format_report

    short = [{"text": f"short review number {i} was fine", "label": ("good", "bad")[i % 2]} for i in range(30)]
    long = [{"text": " ".join(f"word{i}x{j}" for j in range(60)), "label": ("good", "bad")[i % 2]} for i in range(6)]
    recipe = recipe_for(tmp_path, tiny_model_dir, "data.max_length=32", "task=classification", rows=short + long)
    report = prepare(recipe)
    assert report["truncation"]["rows_over_max_length"] == 6
    warning = report["length_warning"]
    assert "6 of 36 rows (16.7%)" in warning and "data.max_length=32" in warning
    suggested = int(warning.split("data.max_length=")[2].split()[0])
    assert 32 < suggested <= 512  # within the tiny model's window
    assert "WARNING: 6 of 36 rows" in format_report(report)
    # Below the threshold: nothing loud.
    quiet = recipe_for(tmp_path, tiny_model_dir, "data.max_length=32", "task=classification", rows=short * 1, name="q")
    assert prepare(quiet)["length_warning"] is None


def test_length_suggestion_is_capped_at_the_model_window(tokenizer):
    from afina.data.prepare import length_warning

    recipe = load_recipe(None, ["data.max_length=64"])
    report = {"truncation": {"rows_over_max_length": 50}}
    warning = length_warning(recipe, [30] * 50 + [900] * 50, report, window=512)
    assert "data.max_length=512 would keep 50%" in warning and "capped at the model's window of 512" in warning


# ---- 5. cleaning keeps code as it is ---------------------------------------------------------------

PYTHON = 'import os\n\n\ndef f(x):\n    """Doc."""\n\n\n    return x  \n\n\n\nclass A:\n    pass'
YAML = "name: run\ndata:\n  path: a.jsonl\n\n\n  split:\n    train: 0.8\n  fields:   \n    text: body"
MARKDOWN = "| a | b |\n|---|---|\n| 1 | 2 |\n\nline one  \nline two"


@pytest.mark.parametrize("lang,code", [("python", PYTHON), ("yaml", YAML), ("markdown", MARKDOWN)])
def test_cleaning_keeps_fenced_code_byte_for_byte(lang, code):
    from afina.config import CleanConfig, PiiConfig
    from afina.data.clean import TextCleaner

    cleaner = TextCleaner(CleanConfig(), PiiConfig())
    answer = f"Here it is:   \n\n\n\n```{lang}\n{code}\n```\n\n\n\nAsk again if it fails."
    cleaned = cleaner.clean_text(answer)
    assert f"```{lang}\n{code}\n```" in cleaned  # the code exactly as written
    assert cleaned.startswith("Here it is:\n\n```") and cleaned.endswith("```\n\nAsk again if it fails.")


@pytest.mark.parametrize("code", [PYTHON, YAML])
def test_cleaning_keeps_unfenced_code_answers(code):
    from afina.data.clean import normalise_whitespace

    assert normalise_whitespace(code) == code
    assert normalise_whitespace(code.replace("\n", "\r\n")) == code  # line ends only


def test_cleaning_still_tidies_prose_and_keeps_markdown_line_breaks():
    from afina.data.clean import normalise_whitespace

    assert normalise_whitespace("Hello   \n\n\n\nworld \t\n") == "Hello\n\nworld"
    assert normalise_whitespace("Roses are red,  \nviolets are blue.") == "Roses are red,  \nviolets are blue."
    assert normalise_whitespace("- one\n- two\n\n\n\nDone.") == "- one\n- two\n\nDone."


# ---- 6. the prepare summary: counts per reason and a real example of each ---------------------------


def test_prepare_summary_shows_counts_and_a_real_example_per_reason(tmp_path, tiny_model_dir):
    from afina.data.prepare import format_report

    base = "the kettle filter needs rinsing every week with warm water and a soft brush said support"
    rows = [{"text": f"{base} {i}", "label": ("good", "bad")[i % 2]} for i in range(6)]
    rows += [
        {"text": f"unrelated review {i} of a film about {i} dragons", "label": ("good", "bad")[i % 2]}
        for i in range(20)
    ]
    recipe = recipe_for(tmp_path, tiny_model_dir, "data.dedup.near=true", "task=classification", rows=rows)
    report = prepare(recipe)
    assert report["dedup"]["near"] >= 3
    text = format_report(report)
    assert "FILE:LINE" not in text and "similarity N" not in text
    counts = [int(line.split()[0]) for line in text.splitlines() if "near duplicate of an earlier row" in line]
    assert sum(counts) == report["dedup"]["near"]  # every reject counted once, under a reason in words
    example = next(line for line in text.splitlines() if "e.g." in line and "near duplicate (similarity 0." in line)
    assert f"{tmp_path}/first.jsonl:" in example  # a real row of the file, with its real similarity


# ---- 3. "none of these": out-of-scope detection ----------------------------------------------------


def test_out_of_scope_plan_and_scores():
    from afina.eval.out_of_scope import calibrate_threshold, oos_plan, oos_scores

    assert oos_plan("auto", ["bad", "good"]).kind == "threshold"
    assert oos_plan("auto", ["bad", "good", "Other"]).label == "Other"
    assert oos_plan("off", ["a", "other"]).kind == "off"
    assert oos_plan("good", ["bad", "good"]).label == "good"
    with pytest.raises(ValueError, match="names no label"):
        oos_plan("weather", ["bad", "good"])
    threshold = calibrate_threshold([i / 100 for i in range(1, 101)])
    assert 0.05 < threshold < 0.07  # 95% of in-scope validation rows lie above it
    scores = oos_scores([True, True, False, False, True], [True, False, False, True, True])
    assert scores["oos_precision"] == pytest.approx(200 / 3) and scores["oos_recall"] == pytest.approx(200 / 3)
    assert scores["in_scope_flagged"] == 50.0


def planted_out_of_scope(tmp_path):
    """Sentiment rows to train on, and a test file with planted out-of-scope rows (label `weather`)."""
    test = labelled_rows(16, seed=3)
    test += [{"text": f"rain and wind over harbour {i} tonight", "label": "weather"} for i in range(8)]
    return write_jsonl(tmp_path / "test.jsonl", test)


def test_out_of_scope_threshold_is_calibrated_on_validation_and_scored(tmp_path, tiny_model_dir):
    from afina.tasks import classification

    test_path = planted_out_of_scope(tmp_path)
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        "task=classification",
        "classification.mode=head",
        "classification.unseen_test_labels=out_of_scope",
        f"data.test_path={test_path}",
        "data.split={train: 0.8, validation: 0.2, test: 0.0}",
        "training.max_steps=6",
        "eval.risks.bias=false",
        "eval.risks.memorisation_rows=0",
        rows=labelled_rows(60),
    )
    prepare(recipe)
    train(recipe, progress=False)
    report = classification.evaluate(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    oos = report["out_of_scope"]
    assert oos["method"] == "threshold" and oos["systems"]["tuned"]["validation_rows"] > 0
    threshold = json.loads((run.root / "out_of_scope.json").read_text())["threshold"]
    assert threshold == pytest.approx(oos["systems"]["tuned"]["threshold"], abs=1e-4)
    predictions = [p for p in map(json.loads, (run.eval / "predictions.jsonl").open()) if p["system"] == "tuned"]
    planted = [p for p in predictions if p["reference"] == "weather"]
    assert len(planted) == 8 and report["test_examples"] == 16  # in-scope metrics on the in-scope rows
    assert all(p["out_of_scope"] == (p["label_probability"] < threshold) for p in predictions)
    scores = report["systems"]["tuned"]
    assert scores["oos_references"] == 8
    assert scores["oos_recall"] == pytest.approx(100 * sum(p["out_of_scope"] for p in planted) / 8, abs=1e-3)


def test_out_of_scope_label_in_the_data_is_scored_as_a_class(tmp_path, tiny_model_dir):
    from afina.tasks import classification

    rows = labelled_rows(48) + [
        {"text": f"rain and wind over harbour {i} tonight", "label": "other"} for i in range(24)
    ]
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        "task=classification",
        "classification.mode=head",
        "training.max_steps=6",
        "eval.risks.bias=false",
        "eval.risks.memorisation_rows=0",
        rows=rows,
    )
    prepare(recipe)
    train(recipe, progress=False)
    report = classification.evaluate(recipe, progress=False)
    assert report["out_of_scope"]["method"] == "label" and report["out_of_scope"]["label"] == "other"
    scores = report["systems"]["tuned"]
    per_class = scores["per_class"]["other"]
    assert scores["oos_recall"] == pytest.approx(per_class["recall"], abs=0.01)
