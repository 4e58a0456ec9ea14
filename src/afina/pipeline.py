"""The stages in order, each recorded in the run's manifest; the task type is looked up here and
handed to the stage functions (afina.tasks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from afina.config import Recipe, RecipeError, load_recipe
from afina.data.prepare import format_report, prepare_data
from afina.eval.summary import format_table
from afina.export.merge import export, format_export
from afina.rundir import RunDir
from afina.tasks import TASKS, settle_task, task_for
from afina.train import estimate as estimate_module
from afina.train import loop
from afina.train.distributed import is_main_process

STAGES = ("prepare", "train", "eval", "export")


def bundled_recipe_path(name: str) -> Path:
    path = Path(str(resources.files("afina") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled recipe named '{name}' (looked for {path})")
    return path


def prepare(recipe: Recipe, strict: bool = False) -> dict[str, Any]:
    """`afina prepare`: the recipe's data read, cleaned, deduplicated and split (afina.data.prepare)."""
    task = TASKS[recipe.task]  # the data decides the task after this (settle_task), not a previous run's
    report = prepare_data(recipe, strict, task.chunking(recipe), task.schemas)
    try:
        note = settle_task(recipe, report.get("schema") or "")  # a mixture has no one schema
    except RecipeError as exc:  # the data is prepared; `afina train` refuses with the same words
        report["warnings"].append(str(exc))
        note = None
    if note:
        report["task_inferred"] = note
    return report


def train(recipe: Recipe, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """`afina train`: the recipe's task type trained by the one training loop (afina.train.loop)."""
    run = RunDir(recipe.run_dir)
    train_rows, val_rows = loop.read_splits(run)
    task = task_for(recipe).training_task(recipe, run, train_rows)
    return loop.train(recipe, task, train_rows, val_rows, progress=progress, resume=resume)


def estimate(
    recipe: Recipe,
    measure_steps: int = 3,
    available: int | None = None,
    processes: int = 1,
    strategy: str | None = None,
    measure: bool = True,
    gpu: str | None = None,
    mfu: float | None = None,
) -> dict[str, Any]:
    """`afina estimate`: parameters, memory and time of the training run, before running it. Before
    `afina prepare`, memory from the model's config alone (a micro-batch of data.max_length rows).
    gpu: a GPU's name (train/gpus.py) to estimate for instead of this device."""
    from afina.train.gpus import find_gpu

    spec = find_gpu(gpu) if gpu else None
    run = RunDir(recipe.run_dir)
    if not run.split_path("train").is_file():
        return estimate_module.estimate(
            recipe, available=available, processes=processes, strategy=strategy, measure=False, gpu=spec, mfu=mfu
        )
    train_rows, _ = loop.read_splits(run)
    task = task_for(recipe).training_task(recipe, run, train_rows)
    return estimate_module.estimate(
        recipe, task, train_rows, measure_steps, available, processes, strategy, measure, gpu=spec, mfu=mfu
    )


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """`afina eval` for the recipe's task type (eval.systems compared, eval/ written)."""
    return task_for(recipe).evaluate(recipe, progress)


def run_stage(stage: str, recipe: Recipe, echo: Callable[[str], None] = print, **options: Any) -> Any:
    """Run one stage, record its wall time in the manifest, and print its summary."""
    run = RunDir(recipe.run_dir)
    if not is_main_process():  # the other processes of a distributed run train silently
        return train(recipe, progress=False, resume=options.get("resume", False)) if stage == "train" else None
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    echo(f"== {stage} ({run.root})")
    if stage != "prepare":
        note = settle_task(recipe)  # a recipe without `task:` on classification data trains a classifier
        if note:
            echo(note)
    with run.stage(stage, recipe.to_dict(), recipe.seed):
        if stage == "prepare":
            result = prepare(recipe, strict=options.get("strict", False))
            echo(format_report(result))
        elif stage == "train":
            result = train(recipe, resume=options.get("resume", False))
            echo(
                f"trained {result['steps']} steps ({result['epochs']} epochs, {result['tokens']} tokens, "
                f"{result['tokens_per_s']} tokens/s, {result['precision']} on {result['device']}); "
                f"validation loss {_fmt(result['val_loss_before'])} -> {_fmt(result['val_loss_after'])}"
                f"{best_kept(result, recipe.training.load_best_at_end)}; saved to {result['output']}"
            )
            if result.get("length"):
                echo(f"{result['length']}; stopped: {result['stopped']}")
        elif stage == "eval":
            result = eval_stage(recipe, echo, table=options.get("eval_table", True))
        elif not task_for(recipe).carries_lm(recipe):
            result = {
                "skipped": f"task {recipe.task} with a head: the trained head is in {run.root}/adapter or model "
                "(head.json names its backbone and labels); use `afina predict`"
            }
            echo(f"export: skipped ({result['skipped']})")
        else:
            result = export(recipe)
            echo(format_export(result))
    return result


def eval_stage(recipe: Recipe, echo: Callable[[str], None], table: bool = True) -> dict[str, Any]:
    """The long-context evaluation first (when the context was extended), so that eval/report.html includes it;
    then the task's own evaluation, and its table unless the caller prints it itself (`table=False`: the
    quickstart prints it once, at the end)."""
    long_context = None
    if recipe.context.rope_scaling != "none" and recipe.context.eval.enabled:
        from afina.eval.long_context import evaluate_long_context, format_long_context

        long_context = evaluate_long_context(recipe, echo)
        echo(format_long_context(long_context))
    result: dict[str, Any] = {}
    if recipe.eval.systems:
        result = evaluate(recipe)
        if table:
            echo(format_table(result))
    if long_context is not None:
        result["long_context"] = long_context
    return result


def run_all(recipe: Recipe, echo: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    results = {stage: run_stage(stage, recipe, echo, **options) for stage in STAGES}
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    return results


def quickstart_recipe(overrides: list[str]) -> Recipe:
    return load_recipe(bundled_recipe_path("quickstart"), overrides)


def best_kept(result: dict[str, Any], load_best_at_end: bool) -> str:
    """' (best 1.234 at step 40, those weights kept)' when the saved weights are not the last step's."""
    best, step = result.get("best_val_loss"), result.get("best_step")
    if not load_best_at_end or best is None or step is None or step == result["steps"]:
        return ""
    return f" (best {best:.3f} at step {step}, those weights kept)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
