"""What the studio shows of a run: read from its run directory (manifest, metrics.jsonl, reports), never
computed a second way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.rundir import RunDir

STAGE_ORDER = ("prepare", "train", "eval", "export")


def is_run(root: Path) -> bool:
    return (
        root.is_dir()
        and not root.is_symlink()
        and not root.name.startswith(".")
        and ((root / "manifest.json").is_file() or (root / "recipe.yaml").is_file())
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(run: RunDir, since: int = 0) -> list[dict[str, Any]]:
    """metrics.jsonl rows after the first `since` (a line being written is skipped until complete)."""
    if not run.metrics.is_file():
        return []
    rows = []
    for line in run.metrics.read_text(encoding="utf-8").splitlines()[since:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def planned_steps(recipe: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[int | None, bool]:
    """The run's total optimizer steps: training.max_steps, or epochs x the steps per epoch seen so far; and
    whether that total is only a cap (no epochs and no max_steps: training stops when validation stops
    improving, at most AUTO_EPOCHS epochs)."""
    from afina.config import AUTO_EPOCHS, FALLBACK_EPOCHS, SplitConfig

    training = recipe.get("training") or {}
    if training.get("max_steps"):  # it overrides epochs
        return int(training["max_steps"]), False
    given = training.get("epochs")
    until_converged = given is None
    if given is None:
        data = recipe.get("data") or {}
        split = {**SplitConfig().model_dump(), **(data.get("split") or {})}
        validation = data.get("validation_path") or (split["validation"] or 0) > 0
        epochs = float(AUTO_EPOCHS if validation else FALLBACK_EPOCHS)
    else:
        epochs = float(given)
    last = next((r for r in reversed(rows) if r.get("epoch")), None)
    total = round(epochs * last["step"] / last["epoch"]) if last else None
    return total, until_converged


def progress(recipe: dict[str, Any], rows: list[dict[str, Any]], running: bool = True) -> dict[str, Any]:
    """Step, planned steps (`at_most`: a cap, the run stops earlier when validation stops improving) and the
    time left (the most it can be, under a cap), from the last metrics row's tokens/s; none when not running."""
    total, at_most = planned_steps(recipe, rows)
    if not rows:
        return {"step": 0, "total": total, "at_most": at_most, "eta_s": None}
    last = rows[-1]
    eta = None
    if running and total and last.get("tokens_per_s"):
        seconds_per_step = last["tokens"] / last["step"] / last["tokens_per_s"]
        eta = round(max(0, total - last["step"]) * seconds_per_step, 1)
    return {"step": last["step"], "total": total, "at_most": at_most, "eta_s": eta}


def train_result(manifest: dict[str, Any]) -> str | None:
    """What the last finished training did, in one sentence (from the manifest), or None."""
    train = manifest.get("train") or {}
    if not train.get("steps"):
        return None
    seconds = ((manifest.get("stages") or {}).get("train") or {}).get("wall_time_s")
    text = f"Trained {train['steps']} steps ({train.get('epochs', 0):g} epochs"
    text += f") in {seconds / 60:.1f} min" if seconds else ")"
    if train.get("tokens_per_s"):
        text += f" at {train['tokens_per_s']:g} tokens/s"
    if train.get("val_loss_before") is not None and train.get("val_loss_after") is not None:
        text += f"; validation loss {train['val_loss_before']:.3f} -> {train['val_loss_after']:.3f}"
    if train.get("best_step") is not None and train.get("best_val_loss") is not None:
        text += f" (best {train['best_val_loss']:.3f} at step {train['best_step']})"
    if train.get("stopped"):
        text += f"; stopped: {train['stopped']}"
    return text + "."


def headline(manifest: dict[str, Any]) -> dict[str, Any]:
    """Validation loss, the first eval metric (tuned vs base), time and cost of a run."""
    stages = manifest.get("stages") or {}
    train = manifest.get("train") or {}
    evaluation = manifest.get("eval") or {}
    out: dict[str, Any] = {
        "stages": [s for s in STAGE_ORDER if s in stages],
        "val_loss": train.get("val_loss_after"),
        "steps": train.get("steps"),
        "tokens_per_s": train.get("tokens_per_s"),
        "wall_time_s": round(sum(s.get("wall_time_s", 0) for s in stages.values()), 1),
        "finished_at": max((s.get("finished_at", "") for s in stages.values()), default=""),
    }
    systems = evaluation.get("systems") or {}
    if systems:
        scores = systems.get("tuned") or next(iter(systems.values()))
        metric = next(iter(scores), None)
        if metric is not None:
            out["metric"] = metric
            out["tuned"] = (systems.get("tuned") or {}).get(metric)
            out["base"] = (systems.get("base") or {}).get(metric)
    price = ((manifest.get("recipe") or {}).get("eval") or {}).get("price_per_hour") or 0.0
    out["cost"] = round(out["wall_time_s"] / 3600 * price, 4) if price else None
    return out


def summary(root: Path) -> dict[str, Any]:
    run = RunDir(root)
    manifest = run.read_manifest()
    return {
        "name": root.name,
        **headline(manifest),
        "has_recipe": (root / "recipe.yaml").is_file(),
        "checkpoints": (root / "checkpoints").is_dir() and any((root / "checkpoints").glob("step-*")),
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        return []
    return [summary(root) for root in sorted(runs_dir.iterdir(), key=lambda p: p.name) if is_run(root)]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def recipe_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every recipe key whose values differ."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def run_recipe(root: Path) -> dict[str, Any]:
    """The recipe the run's stages used (manifest), else the saved recipe.yaml."""
    import yaml

    recipe = RunDir(root).read_manifest().get("recipe")
    if recipe:
        return recipe
    path = root / "recipe.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    return {}
