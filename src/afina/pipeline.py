"""The stages in order, each recorded in the run's manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from afina.config import Recipe, load_recipe
from afina.rundir import RunDir

STAGES = ("prepare", "train", "eval", "export")


def bundled_recipe_path(name: str) -> Path:
    path = Path(str(resources.files("afina") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled recipe named '{name}' (looked for {path})")
    return path


def run_stage(stage: str, recipe: Recipe, echo: Callable[[str], None] = print, **options: Any) -> Any:
    """Run one stage, record its wall time in the manifest, and print its summary."""
    from afina.data.prepare import format_report, prepare
    from afina.eval.evaluate import format_table
    from afina.tasks import evaluate_task, exports_weights
    from afina.export.merge import export
    from afina.train.loop import train

    from afina.train.distributed import is_main_process

    run = RunDir(recipe.run_dir)
    if not is_main_process():  # the other processes of a distributed run train silently
        return train(recipe, progress=False, resume=options.get("resume", False)) if stage == "train" else None
    echo(f"== {stage} ({run.root})")
    with run.stage(stage, recipe.to_dict(), recipe.seed):
        if stage == "prepare":
            result = prepare(recipe, strict=options.get("strict", False))
            echo(format_report(result))
        elif stage == "train":
            result = train(recipe, resume=options.get("resume", False))
            echo(
                f"trained {result['steps']} steps ({result['epochs']} epochs, {result['tokens']} tokens, "
                f"{result['tokens_per_s']} tokens/s, {result['precision']} on {result['device']}); "
                f"validation loss {_fmt(result['val_loss_before'])} -> {_fmt(result['val_loss_after'])}; "
                f"saved to {result['output']}"
            )
        elif stage == "eval":
            result = {}
            if recipe.context.rope_scaling != "none" and recipe.context.eval.enabled:
                from afina.eval.long_context import evaluate_long_context, format_long_context

                # First, so that eval/report.html (written by evaluate) includes it.
                long_context = evaluate_long_context(recipe, echo)
                echo(format_long_context(long_context))
            if recipe.eval.systems:
                result = evaluate_task(recipe)
                echo(format_table(result))
            if recipe.context.rope_scaling != "none" and recipe.context.eval.enabled:
                result["long_context"] = long_context
        elif stage == "export" and not exports_weights(recipe):
            result = {"skipped": f"task {recipe.task} with a head: the trained head is in {run.root}/adapter or model "
                      "(head.json names its backbone and labels); use `afina predict`"}
            echo(f"export: skipped ({result['skipped']})")
        elif stage == "export":
            result = export(recipe)
            for fmt, info in result.items():
                if "skipped" in info:
                    echo(f"{fmt}: skipped ({info['skipped']})")
                elif "max_logit_diff" in info:
                    echo(f"{fmt}: {info['path']} (verified: max logit diff {info['max_logit_diff']:.2e}, "
                         f"greedy text equal: {info['greedy_text_equal']})")
                else:
                    echo(f"{fmt}: {info['path']} (verified: template reproduces the chat template: "
                         f"{info['template_matches_chat_template']}; stop {', '.join(info['stop'])})")
        else:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return result


def run_all(recipe: Recipe, echo: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    results = {stage: run_stage(stage, recipe, echo, **options) for stage in STAGES}
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    return results


def quickstart_recipe(overrides: list[str]) -> Recipe:
    return load_recipe(bundled_recipe_path("quickstart"), overrides)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
