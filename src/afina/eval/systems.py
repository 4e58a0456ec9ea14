"""The two models an evaluation compares: the tuned model and the base it started from.

Under LoRA the base is the same weights with the adapter switched off (one copy in memory);
after full fine-tuning the base is loaded on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from afina.config import Recipe
from afina.device import recipe_weight_dtype
from afina.models import load_model, load_trained
from afina.rundir import RunDir

TUNED_SYSTEMS = ("tuned", "tuned_rag")


@dataclass
class SystemModels:
    """`models.get("base")` / `models.get("tuned")` -> (model, context to run it in)."""

    recipe: Recipe
    device: Any
    tuned: Any = None
    _base: Any = None

    @classmethod
    def load(cls, recipe: Recipe, device, with_tuned: bool = True) -> SystemModels:
        """The run's trained model (as `afina train` left it for this recipe), the base on demand."""
        tuned = None
        if with_tuned:
            run = RunDir(recipe.run_dir)
            tuned = load_trained(
                run.root,
                recipe.model.name,
                device,
                recipe_weight_dtype(recipe, device),
                full=recipe.method.type == "full",
            )
        return cls(recipe, device, tuned)

    def get(self, system: str) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
        if system in TUNED_SYSTEMS:
            return self.tuned, contextlib.nullcontext
        if self.tuned is not None and hasattr(self.tuned, "disable_adapter"):
            return self.tuned, self.tuned.disable_adapter
        if self._base is None:
            dtype = recipe_weight_dtype(self.recipe, self.device)
            self._base = load_model(self.recipe.model.name, dtype).to(self.device)
        return self._base, contextlib.nullcontext
