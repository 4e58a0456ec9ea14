"""Sequential fine-tuning: stage recipes, replay, weights carried from stage to stage, the table."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from afina.config import RecipeError, load_recipe
from afina.rundir import RunDir, read_jsonl
from afina.sequential import format_sequential_table, merged_dir, run_sequential, stage_recipes
from conftest import support_rows, write_jsonl


def two_stage_recipe(tmp_path, tiny_model_dir, replay: float = 0.0, extra: list[str] | None = None):
    first = write_jsonl(tmp_path / "first.jsonl", support_rows(n_facts=4, per_fact=5))
    second_rows = [
        {
            "messages": [
                {"role": "user", "content": f"Translate colour number {i} to French."},
                {"role": "assistant", "content": ["rouge", "bleu", "vert", "jaune", "noir"][i % 5] + f" {i}"},
            ]
        }
        for i in range(20)
    ]
    second = write_jsonl(tmp_path / "second.jsonl", second_rows)
    return load_recipe(
        None,
        [
            "name=seq",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={tiny_model_dir}",
            "training.batch_size=4",
            "training.max_steps=3",
            "training.learning_rate=0.01",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            f"stages=[{{name: support, data: {{path: '{first}'}}}}, "
            f"{{name: colours, replay: {replay}, data: {{path: '{second}'}}, training: {{max_steps: 2}}}}]",
            *(extra or []),
        ],
    )


def test_stage_recipes_chain_models_and_merge_sections(tmp_path, tiny_model_dir):
    recipe = two_stage_recipe(tmp_path, tiny_model_dir)
    first, second = stage_recipes(recipe)
    assert first.model.name == str(tiny_model_dir)
    assert second.model.name == str(merged_dir(first))  # stage 2 starts from stage 1's weights
    assert first.training.max_steps == 3 and second.training.max_steps == 2  # the stage's own value wins
    assert second.training.learning_rate == 0.01  # the rest comes from the top level
    assert first.run_dir == recipe.run_dir / "stages" / "01-support"
    assert second.data.path.endswith("second.jsonl")


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[{name: a, data: {path: x.jsonl}}, {name: a, data: {path: y.jsonl}}]", "unique"),
        ("[{name: a}]", "needs its own `data:`"),
        ("[{name: a, data: {path: x.jsonl}, model: {name: other}}]", "cannot set `model`"),
        ("[{name: a, data: {path: x.jsonl}, trainig: {epochs: 1}}]", "stages[0] (a)"),
    ],
)
def test_bad_stages_are_clear_errors(tmp_path, stages, message):
    recipe = load_recipe(None, [f"output_dir={tmp_path}", f"stages={stages}"])
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        stage_recipes(recipe)


def test_replay_rejects_a_share_of_one(tmp_path):
    with pytest.raises(RecipeError, match="replay"):
        load_recipe(None, ["stages=[{name: a, replay: 1.0, data: {path: x.jsonl}}]"])


def test_sequential_run_with_replay(tmp_path, tiny_model_dir):
    recipe = two_stage_recipe(tmp_path, tiny_model_dir, replay=0.25)
    result = run_sequential(recipe, echo=lambda _line: None)
    first, second = stage_recipes(recipe)

    # The table: the base row scores every task, then each stage row the tasks so far.
    assert [row["after"] for row in result["table"]] == ["base", "support", "colours"]
    assert list(result["table"][0]["scores"]) == ["support", "colours"]
    assert list(result["table"][1]["scores"]) == ["support"]
    assert list(result["table"][2]["scores"]) == ["support", "colours"]
    for row in result["table"]:
        for score in row["scores"].values():
            assert score["metric"] == "test_loss" and score["value"] > 0

    # Training lowers the first task's loss (lr 0.01 on a tiny random model).
    assert result["table"][1]["scores"]["support"]["value"] < result["table"][0]["scores"]["support"]["value"]

    # Replay: earlier rows make up a quarter of stage 2's train split, marked with their source.
    train_rows = read_jsonl(RunDir(second.run_dir).split_path("train"))
    replayed = [r for r in train_rows if r.get("replay_from") == first.name]
    own = len(train_rows) - len(replayed)
    assert len(replayed) == round(0.25 * own / 0.75) == result["replay"]["colours"][first.name]
    first_train = {json.dumps(r["messages"]) for r in read_jsonl(RunDir(first.run_dir).split_path("train"))}
    assert all(json.dumps(r["messages"]) in first_train for r in replayed)

    # Stage 2 trained from stage 1's merged weights: its merged weights differ from both.
    w1 = load_file(str(merged_dir(first) / "model.safetensors"))
    w2 = load_file(str(merged_dir(second) / "model.safetensors"))
    key = next(k for k in w1 if "q_proj" in k)
    assert not (w1[key] == w2[key]).all()

    saved = json.loads((recipe.run_dir / "sequential.json").read_text())
    assert saved["table"] == result["table"]
    table = format_sequential_table(result)
    assert table.splitlines()[0] == "| after \\ task | support | colours |"
    assert len(table.splitlines()) == 5


def classification_stages_recipe(tmp_path, tiny_model_dir, replay: float):
    mood = [
        {"text": f"review {i}: {'great fun' if i % 2 else 'dull mess'}", "label": "positive" if i % 2 else "negative"}
        for i in range(24)
    ]
    topic = [
        {
            "text": f"note {i}: {'the match ended two all' if i % 2 else 'add salt to the soup'}",
            "label": "sports" if i % 2 else "food",
        }
        for i in range(24)
    ]
    first = write_jsonl(tmp_path / "mood.jsonl", mood)
    second = write_jsonl(tmp_path / "topic.jsonl", topic)
    return load_recipe(
        None,
        [
            "name=seqcls",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={tiny_model_dir}",
            "task=classification",
            "training.batch_size=4",
            "training.max_steps=2",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            f"stages=[{{name: mood, task: classification, data: {{path: '{first}'}}}}, "
            f"{{name: topic, task: classification, replay: {replay}, data: {{path: '{second}'}}}}]",
        ],
    )


def test_sequential_generative_classification_with_replay(tmp_path, tiny_model_dir):
    recipe = classification_stages_recipe(tmp_path, tiny_model_dir, replay=0.2)
    result = run_sequential(recipe, echo=lambda _line: None)
    first, second = stage_recipes(recipe)
    last = result["table"][-1]["scores"]
    assert set(last) == {"mood", "topic"}
    for score in last.values():
        assert score["metric"] == "accuracy" and 0.0 <= score["value"] <= 100.0 and score["examples"] > 0
    # Replayed mood rows arrive in the topic stage as finished chats answering with a mood label.
    replayed = [r for r in read_jsonl(RunDir(second.run_dir).split_path("train")) if "replay_from" in r]
    assert replayed and all(r["messages"][-1]["content"] in {"positive", "negative"} for r in replayed)
    assert all("negative, positive" in r["messages"][-2]["content"] for r in replayed)


def test_a_head_task_cannot_be_a_stage(tmp_path, tiny_model_dir):
    recipe = classification_stages_recipe(tmp_path, tiny_model_dir, replay=0.0)
    data = recipe.to_dict()
    data["stages"][1]["classification"] = {"mode": "head"}
    from afina.config import build_recipe

    with pytest.raises(RecipeError, match="cannot be a stage"):
        stage_recipes(build_recipe(data, "test", tmp_path))


def test_a_context_extended_stage_hands_on_its_rope_scaling(tmp_path, tiny_model_dir):
    """Stage 1 extends the window (YaRN x2): its merged weights, which stage 2 starts from and the table scores,
    keep the scaled positions; stage 2 does not extend again."""
    recipe = two_stage_recipe(
        tmp_path, tiny_model_dir, extra=["context.rope_scaling=yarn", "context.factor=2", "context.eval.enabled=false"]
    )
    first, second = stage_recipes(recipe)
    assert first.context.rope_scaling == "yarn" and second.context.rope_scaling == "none"
    run_sequential(recipe, echo=lambda _line: None)
    for stage in (first, second):
        config = json.loads((merged_dir(stage) / "config.json").read_text())
        assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
        assert config["max_position_embeddings"] == 1024  # the tiny model's 512, extended
