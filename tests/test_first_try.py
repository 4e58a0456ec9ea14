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
