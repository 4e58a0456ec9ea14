"""The interface every task type implements; afina/tasks/__init__.py maps names to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from afina.config import Recipe
from afina.data.format import Chunking
from afina.rundir import RunDir
from afina.train.task import TrainingTask

Rows = list[dict[str, Any]]


def _always(recipe: Recipe) -> bool:
    return True


def _no_chunks(recipe: Recipe) -> Chunking | None:
    return None


@dataclass(frozen=True)
class TaskType:
    """What differs per task type; every stage asks the recipe's TaskType instead of testing `recipe.task`.

    training_task(recipe, run, train_rows): examples, model and loss for `afina train` / `afina estimate`
    evaluate(recipe, progress): `afina eval`; writes eval/ and returns the report
    score_model(recipe, model_spec): a sequential stage's score of a plain causal LM on this task's test split
    as_chat_rows(recipe, rows): train rows as self-contained chats, replayed inside a later stage
    predict_rows(recipe, rows, batch_size): `afina predict` (None: the task answers through `afina serve`)
    carries_lm(recipe): the result is a causal LM (export to merged/GGUF/Ollama; can be a sequential stage)
    chunking(recipe): documents cut into chunks of tokens by `afina prepare` (domain adaptation), or None
    schemas: the row shapes `afina prepare` guesses among (None: every shape but the preference ones)
    """

    name: str
    training_task: Callable[[Recipe, RunDir, Rows], TrainingTask]
    evaluate: Callable[..., dict[str, Any]]
    score_model: Callable[[Recipe, str], dict[str, Any]]
    as_chat_rows: Callable[[Recipe, Rows], Rows]
    predict_rows: Callable[..., Rows] | None = None
    carries_lm: Callable[[Recipe], bool] = _always
    chunking: Callable[[Recipe], Chunking | None] = _no_chunks
    schemas: tuple[str, ...] | None = None
