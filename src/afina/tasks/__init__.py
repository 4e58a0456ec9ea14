"""What differs per task type: how rows become training examples, which model and loss train them,
how the result is evaluated and how it predicts.

    chat            generative fine-tuning on chat rows (the default)
    classification  text -> label: generative labels (constrained to the label set) or a head
    tagging         words -> BIO tags (named entities): a token-classification head

The training loop (train/loop.py) is one loop for all of them: it asks the task for a
TrainingTask and keeps accumulation, checkpoints, resume, monitoring and early stopping itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afina.config import Recipe
from afina.rundir import RunDir


@dataclass
class TrainingTask:
    """What the training loop needs from a task type.

    encode: canonical rows -> examples (each a dict with `input_ids` and `labels` lists)
    build_model: device -> the model, with exactly the trainable weights requiring grad
    collate(examples, rows, pad_id, pack_length): a micro-batch of tensors
    loss_fn(model, **batch) -> (loss sum, label count); count_fn(micro_batches) -> label count
    """

    tokenizer: Any
    encode: Callable[[list[dict[str, Any]]], list[dict[str, list[int]]]]
    build_model: Callable[[Any], Any]
    output_dir: Path
    method: str
    collate: Callable[..., dict] | None = None
    loss_fn: Callable[..., tuple] | None = None
    count_fn: Callable[[list[dict]], int] | None = None
    supports_packing: bool = True
    param_groups: Callable[[Any], list[dict[str, Any]]] | None = None
    on_save: Callable[[Path], None] | None = None  # writes what prediction needs beside the weights (labels)
    extra_summary: dict[str, Any] = field(default_factory=dict)


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    """The TrainingTask of the recipe's task type."""
    if recipe.task == "classification":
        from afina.tasks import classification

        return classification.training_task(recipe, run, train_rows)
    if recipe.task == "tagging":
        from afina.tasks import tagging

        return tagging.training_task(recipe, run, train_rows)
    from afina.tasks.chat import chat_task

    return chat_task(recipe, run)


def exports_weights(recipe: Recipe) -> bool:
    """Whether `afina export` applies: chat models (and generative classifiers) export to merged/GGUF/Ollama;
    a head model's result is its adapter/ or model/ folder (with head.json) as training wrote it."""
    return recipe.task == "chat" or (recipe.task == "classification" and recipe.classification.mode == "generative")


def evaluate_task(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """`afina eval` for the recipe's task type."""
    if recipe.task == "classification":
        from afina.tasks import classification

        return classification.evaluate(recipe, progress=progress)
    if recipe.task == "tagging":
        from afina.tasks import tagging

        return tagging.evaluate(recipe, progress=progress)
    from afina.eval.evaluate import evaluate

    return evaluate(recipe, progress=progress)


# `afina predict`: task type -> the module whose predict_rows(recipe, rows) adds prediction fields.
# A new task type registers here with its own predict_rows.
PREDICTORS: dict[str, str] = {
    "classification": "afina.tasks.classification",
    "tagging": "afina.tasks.tagging",
}


def predictor_for(task: str) -> Callable[..., list[dict[str, Any]]]:
    import importlib

    from afina.config import RecipeError

    if task not in PREDICTORS:
        raise RecipeError(f"afina predict supports task {', '.join(PREDICTORS)}; this recipe's task is '{task}' "
                         "(chat models answer through `afina serve`)")
    return importlib.import_module(PREDICTORS[task]).predict_rows


def predict_file(recipe: Recipe, input_path: Path, output_path: Path, batch_size: int | None = None) -> dict[str, Any]:
    """`afina predict`: rows of a file in (JSONL, CSV, ... as `afina prepare` reads them), the same rows
    with prediction fields out as JSONL. A row that cannot be read stops it with file:line."""
    from afina.data.load import DataError, Reject, iter_source
    from afina.rundir import write_jsonl

    predict_rows = predictor_for(recipe.task)
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"{output_path}: the output would overwrite the input file; name another --output")
    rows = []
    for item in iter_source(input_path):
        if isinstance(item, Reject):
            raise DataError(item.message())
        rows.append(item.row)
    if not rows:
        raise DataError(f"{input_path}: no rows to predict")
    try:
        predicted = predict_rows(recipe, rows, batch_size)
    except ValueError as exc:
        raise DataError(f"{input_path}: {exc}") from None
    write_jsonl(output_path, predicted)
    return {"rows": len(predicted), "output": str(output_path)}
