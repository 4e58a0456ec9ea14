"""`eval.max_examples`: which test rows an evaluation scores when it may not score them all."""

from __future__ import annotations

import random
from typing import Any


def eval_rows(recipe) -> list[dict[str, Any]]:
    """The run's prepared test split, or its eval.max_examples sample (see sample_test_rows)."""
    from afina.rundir import RunDir, read_jsonl

    run = RunDir(recipe.run_dir)
    return sample_test_rows(
        read_jsonl(run.require(run.split_path("test"), "prepare")), recipe.eval.max_examples, recipe.seed
    )


def sample_test_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded random sample of `limit` rows (of every task, for a multi-task split), kept in file order.

    A sample, not the first rows: a test file may be sorted (Banking77's is, by intent), and its
    first rows would then be a few classes. The same seed gives the same rows to every system and run.
    """
    if not limit:
        return rows
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get("task", "")), []).append(i)
    rng = random.Random(seed)
    keep = sorted(
        i for indices in groups.values() for i in (indices if len(indices) <= limit else rng.sample(indices, limit))
    )
    return [rows[i] for i in keep]
