"""`task: chat`: next-token loss on the assistant turns of chat rows (the default task)."""

from __future__ import annotations

from afina.config import Recipe
from afina.rundir import RunDir
from afina.tasks import TrainingTask


def chat_task(recipe: Recipe, run: RunDir, messages_of=None) -> TrainingTask:
    """Chat rows, or any rows that `messages_of(row)` turns into a chat (generative classification)."""
    from afina.models import load_tokenizer
    from afina.models.rope import recipe_rope_settings
    from afina.train.loop import encode_split
    from afina.train.methods import apply_method, load_for_method

    tokenizer = load_tokenizer(recipe.model.name)

    def encode(rows):
        if messages_of is not None:
            rows = [{"messages": messages_of(row)} for row in rows]
        return encode_split(tokenizer, rows, recipe.data.train_on, recipe)

    return TrainingTask(
        tokenizer=tokenizer,
        encode=encode,
        build_model=lambda device: apply_method(
            load_for_method(recipe.model.name, recipe.method, device, recipe_rope_settings(recipe)), recipe.method
        ),
        output_dir=run.model if recipe.method.type == "full" else run.adapter,
        method=recipe.method.type,
    )
