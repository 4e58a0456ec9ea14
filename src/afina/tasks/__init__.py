"""Task types: what differs per task, behind one interface (afina.tasks.base.TaskType).

    chat            generative fine-tuning on chat rows (the default)
    classification  text -> label: generative labels (constrained to the label set) or a head
    tagging         words -> BIO tags (named entities): a token-classification head
    domain          continued pre-training on raw text, scored by perplexity
    preference      DPO, IPO, ORPO, SimPO or KTO on chosen/rejected pairs, scored by preference accuracy
    tools           function calling: chat rows with tools and calls, scored on the calls (decision, name, arguments)

Adding a task type: one module here defining `TASK = TaskType(...)`, one line in TASKS, one
config section (and its name in `Recipe.task`). The stages (prepare, train, estimate, eval,
export, predict, sequential) ask `task_for(recipe)` and never test the task's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from afina.config import Recipe, RecipeError
from afina.rundir import RunDir
from afina.tasks import chat, classification, domain, preference, tagging, tools
from afina.tasks.base import TaskType

TASKS: dict[str, TaskType] = {
    task.name: task for task in (chat.TASK, classification.TASK, tagging.TASK, domain.TASK, preference.TASK, tools.TASK)
}


# Prepared rows of these schemas can only be read by their own task: a chat model trained on them would
# learn the text alone and ignore the labels.
SCHEMA_TASKS: dict[str, Literal["classification", "tagging"]] = {
    "classification": "classification",
    "tagging": "tagging",
}


def task_for(recipe: Recipe) -> TaskType:
    """The recipe's task type, settled against the prepared data first (see `settle_task`)."""
    settle_task(recipe)
    return TASKS[recipe.task]


def settle_task(recipe: Recipe, schema: str | None = None) -> str | None:
    """Make the task fit the prepared data (`schema`, default: the run's manifest); a note when it was inferred.

    A recipe that names no task gets the task its data's schema needs (classification data -> task:
    classification), and the note says so. A recipe that names task: chat for such data stops here with
    the fix, rather than training a chat model on the text alone.
    """
    if schema is None:
        schema = RunDir(recipe.run_dir).read_manifest().get("data", {}).get("schema")
    wanted = SCHEMA_TASKS.get(str(schema))
    if wanted is None or recipe.task == wanted or recipe.task != "chat":
        return None
    if "task" in recipe.model_fields_set:
        raise RecipeError(
            f"task: chat trains on chat turns, but the prepared data is {schema} rows "
            f"({'text and label' if schema == 'classification' else 'words and tags'}), which a chat model "
            f"cannot learn from (it would see the text alone). Set task: {wanted} (or leave task out and afina "
            "infers it), or map the data to chat turns (data.schema=prompt_completion with data.fields) and "
            "run `afina prepare` again"
        )
    recipe.task = wanted
    return (
        f"task: {wanted} (inferred: the prepared data's schema is {schema}; "
        f"write `task: {wanted}` in the recipe to say so)"
    )


def predict_file(recipe: Recipe, input_path: Path, output_path: Path, batch_size: int | None = None) -> dict[str, Any]:
    """`afina predict`: rows of a file in (JSONL, CSV, ... as `afina prepare` reads them), the same rows
    with prediction fields out as JSONL. A row that cannot be read stops it with file:line."""
    from afina.data.load import DataError, Reject, iter_source
    from afina.rundir import write_jsonl

    predict_rows = task_for(recipe).predict_rows
    if predict_rows is None:
        able = ", ".join(name for name, task in TASKS.items() if task.predict_rows)
        raise RecipeError(
            f"afina predict supports task {able}; this recipe's task is '{recipe.task}' "
            "(chat models answer through `afina serve`)"
        )
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
