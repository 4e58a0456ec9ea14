"""Sequential fine-tuning: stages in order, each starting from the previous stage's weights.

After every stage the current model is scored on the test split of every stage so far, so the
stage x task table shows what later stages cost earlier tasks (catastrophic forgetting). Replay
mixes a share of earlier stages' train rows into a later stage's train split to reduce it.

Layout under the run directory:

    <run>/stages/01-<name>/   a normal run directory per stage (data/, adapter/, merged/, ...)
    <run>/sequential.json     the table, the replay counts and the wall times
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from afina.config import Recipe, RecipeError, build_recipe
from afina.models import load_tokenizer, load_trained
from afina.models.saved import require_saved_weights
from afina.pipeline import run_stage
from afina.rundir import RunDir, read_jsonl, write_json_atomic, write_jsonl
from afina.tasks import task_for

# Sections a stage replaces whole (its own data and task); every other section merges key by key.
STAGE_OWN_SECTIONS = ("data", "task", "classification", "tagging", "domain")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """One full recipe per stage: the top-level recipe with the stage's sections over it.

    Every stage after the first starts from the weights the stage before it leaves in
    <stage>/merged; the model folder does not exist yet when the recipes are built.
    """
    if not recipe.stages:
        raise RecipeError("the recipe has no `stages:`; sequential runs need at least one stage")
    names = [stage.name for stage in recipe.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"stage names must be unique, got {names}")
    top = recipe.to_dict()
    top.pop("stages")
    recipes, previous = [], None
    for index, stage in enumerate(recipe.stages):
        own = dict(stage.model_extra or {})
        if "model" in own:
            raise RecipeError(
                f"stages[{index}] ({stage.name}): a stage cannot set `model`; stage 1 starts from the top-level "
                "model and each later stage from the one before it"
            )
        if "data" not in own:
            raise RecipeError(f"stages[{index}] ({stage.name}): every stage needs its own `data:` section")
        base = {k: v for k, v in top.items() if k not in STAGE_OWN_SECTIONS}
        data = _merge(base, own)
        data["name"] = f"{index + 1:02d}-{stage.name}"
        data["output_dir"] = str(recipe.run_dir / "stages")
        if previous is not None:
            data["model"] = {**top["model"], "name": str(merged_dir(previous))}
            if previous.context.rope_scaling != "none" and "context" not in own:
                # The model this stage starts from already carries the extended positions (in its config).
                data["context"] = {"rope_scaling": "none"}
        stage_recipe = build_recipe(data, f"stages[{index}] ({stage.name})", recipe._base_dir)
        check_stage_task(stage_recipe, f"stages[{index}] ({stage.name})")
        recipes.append(stage_recipe)
        previous = stage_recipe
    return recipes


def check_stage_task(stage_recipe: Recipe, where: str) -> None:
    """Stages hand one causal LM from stage to stage, so every stage must train and score that LM."""
    if not task_for(stage_recipe).carries_lm(stage_recipe):
        raise RecipeError(
            f"{where}: sequential stages carry one language model from stage to stage; a task with its own head "
            "(tagging, classification.mode=head) cannot be a stage. Use classification.mode=generative"
        )


def merged_dir(stage_recipe: Recipe) -> Path:
    return stage_recipe.run_dir / "merged"


def task_train_rows(stage_recipe: Recipe, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a stage's train split as self-contained chat rows, to replay inside another stage."""
    return task_for(stage_recipe).as_chat_rows(stage_recipe, rows)


def add_replay(stage_recipe: Recipe, earlier: list[Recipe], share: float, seed: int) -> dict[str, int]:
    """Append rows of earlier stages' train splits so that they make up `share` of the new train split.

    The draw is seeded and spread evenly over the earlier stages (each gives at most all it has).
    """
    run = RunDir(stage_recipe.run_dir)
    path = run.split_path("train")
    own = read_jsonl(path)
    wanted = round(share * len(own) / (1.0 - share))
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    pools = [(r, read_jsonl(RunDir(r.run_dir).split_path("train"))) for r in earlier]
    per_stage = [wanted // len(pools) + (1 if i < wanted % len(pools) else 0) for i in range(len(pools))]
    replayed = []
    for (source, rows), n in zip(pools, per_stage):
        drawn = rng.sample(rows, min(n, len(rows)))
        for row in task_train_rows(source, drawn):
            replayed.append({**row, "replay_from": source.name})
        counts[source.name] = len(drawn)
    mixed = own + replayed
    rng.shuffle(mixed)
    write_jsonl(path, mixed)
    run.update_manifest(replay={"share": share, "rows": counts, "own_rows": len(own)})
    return counts


def consolidate(stage_recipe: Recipe) -> Path:
    """Write the stage's resulting weights as one plain model folder for the next stage to load (a LoRA
    adapter merged into its base, with the rope settings it was trained with in the config)."""
    run = RunDir(stage_recipe.run_dir)
    target = merged_dir(stage_recipe)
    model = load_trained(run.root, stage_recipe.model.name, full=stage_recipe.method.type == "full", merge=True)
    model.save_pretrained(target, safe_serialization=True)
    require_saved_weights(target)
    load_tokenizer(stage_recipe.model.name, stage_recipe.model.chat_template).save_pretrained(target)
    return target


def score_stage_task(stage_recipe: Recipe, model_spec: str) -> dict[str, Any]:
    """The model's score on one stage's test split, by that stage's task."""
    return task_for(stage_recipe).score_model(stage_recipe, model_spec)


def run_sequential(recipe: Recipe, echo: Callable[[str], None] = print, strict: bool = False) -> dict[str, Any]:
    """Prepare every stage, score the starting model on all of them, then train stage after stage."""
    start = time.perf_counter()
    recipes = stage_recipes(recipe)
    for stage_recipe in recipes:
        # Later stages' models do not exist yet; the tokenizer (all prepare needs) is the first model's.
        with_first_model = stage_recipe.model_copy(
            update={"model": stage_recipe.model.model_copy(update={"name": recipe.model.name})}
        )
        run_stage("prepare", with_first_model, echo, strict=strict)
    names = [stage.name for stage in recipe.stages]
    table: list[dict[str, Any]] = []

    def score_row(after: str, model_spec: str, upto: int) -> None:
        scores = {names[j]: score_stage_task(recipes[j], model_spec) for j in range(upto)}
        table.append({"after": after, "scores": scores})
        echo(f"scores after {after}: " + ", ".join(f"{n} {s['metric']} {s['value']}" for n, s in scores.items()))

    score_row("base", recipe.model.name, len(recipes))
    replay: dict[str, dict[str, int]] = {}
    stage_times: dict[str, float] = {}
    for index, (stage, stage_recipe) in enumerate(zip(recipe.stages, recipes)):
        if stage.replay > 0 and index > 0:
            replay[stage.name] = add_replay(stage_recipe, recipes[:index], stage.replay, recipe.seed + index)
            echo(f"replay into {stage.name}: {replay[stage.name]}")
        began = time.perf_counter()
        run_stage("train", stage_recipe, echo)
        stage_times[stage.name] = round(time.perf_counter() - began, 1)
        model_path = consolidate(stage_recipe)
        score_row(stage.name, str(model_path), index + 1)
    result = {
        "stages": names,
        "table": table,
        "replay": replay,
        "train_time_s": stage_times,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    RunDir(recipe.run_dir).root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recipe.run_dir / "sequential.json", result)
    echo(format_sequential_table(result))
    return result


def format_sequential_table(result: dict[str, Any]) -> str:
    """Rows: the model after each stage; columns: each stage's task on its test split."""
    names = result["stages"]
    header = "| after \\ task | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    for row in result["table"]:
        cells = []
        for name in names:
            score = row["scores"].get(name)
            cells.append("" if score is None else f"{score['metric']} {score['value']}")
        lines.append(f"| {row['after']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
