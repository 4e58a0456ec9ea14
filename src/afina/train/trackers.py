"""Experiment trackers (`training.report_to`): TensorBoard, MLflow and Weights & Biases.

Each receives the same thing: every metrics line the training loop writes to metrics.jsonl, at its step
(`train/loss`, `train/lr`, `train/tokens_per_s`, ..., `validation/loss`), the resolved recipe as parameters
(dotted keys: `training.learning_rate`), and at the end the run's plots and reports as artifacts. A tracker
named but not installed stops the run before any model is loaded, naming the package to install.

Where they write, by default inside the run directory so a run stays one folder:
- tensorboard: `<run>/tensorboard/` (event files);
- mlflow: `$MLFLOW_TRACKING_URI` when set (a server, a database), else a file store in `<run>/mlruns`;
  experiment `$MLFLOW_EXPERIMENT_NAME` or "afina", run name the recipe's `name`;
- wandb: `<run>/wandb/`; project `$WANDB_PROJECT` or "afina"; `$WANDB_MODE`, else online only when
  `$WANDB_API_KEY` is set and offline otherwise (`wandb sync <run>/wandb/offline-run-*` uploads it later).

A resumed run continues the same MLflow and W&B runs (their ids are kept in `<run>/trackers.json`), and so does
`afina eval`: its numbers (`eval/<system>/<metric>`) and eval/report.html join the training's run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from afina.config import RecipeError

# The package each tracker imports, and what installs it.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or: pip install 'afina[trackers]')"),
    "wandb": ("wandb", "pip install wandb (or: pip install 'afina[trackers]')"),
}
# Files of a run logged as artifacts when training ends (those that exist).
ARTIFACTS = ("plots/training.png", "metrics.jsonl", "data/report.html", "data/report.json")
EVAL_ARTIFACTS = ("eval/report.html", "eval/metrics.json")
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, root: Path, paths: list[str]) -> None: ...
    def close(self, failed: bool) -> None: ...


def check_trackers(names: Sequence[str]) -> None:
    """Stop before training when a tracker in `training.report_to` is not installed."""
    for name in names:
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"training.report_to: {name} is not installed; install it with: {install}")


def metric_name(key: str) -> str:
    """A metrics.jsonl key as the trackers show it: `loss` -> `train/loss`, `val_loss` -> `validation/loss`."""
    return "validation/loss" if key == "val_loss" else f"train/{key}"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved recipe as tracker parameters: dotted keys, lists and nulls as JSON text."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoardTracker:
    def __init__(self, root: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events written after its checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(root / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifacts(self, root: Path, paths: list[str]) -> None:
        """TensorBoard keeps scalars, not files: the plots stay in the run directory beside its events."""

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, root: Path, run_name: str, params: dict[str, str], run_id: str | None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store only on request; it is the store that needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (root / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "afina")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_name, tags={"afina.run_dir": str(root.resolve())})
            self.run_id = run.info.run_id
            items = [Param(key, value[:6000]) for key, value in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, root: Path, paths: list[str]) -> None:
        for path in paths:
            folder = str(Path(path).parent)
            self.client.log_artifact(self.run_id, str(root / path), None if folder == "." else folder)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    def __init__(self, root: Path, run_name: str, config: dict[str, Any], run_id: str | None):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "afina"),
            name=run_name,
            dir=str(root),
            config=config,
            mode=mode,  # type: ignore[arg-type]
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
        )
        self.run_id = self.run.id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifacts(self, root: Path, paths: list[str]) -> None:
        for path in paths:
            self.run.save(str(root / path), base_path=str(root), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_trackers(names: Sequence[str], root: Path, recipe: dict[str, Any], resume_step: int | None) -> list[Tracker]:
    """The trackers of `training.report_to`, each started (or, on resume, continued) for this run."""
    names = list(dict.fromkeys(names))  # each tracker once, in the order given
    check_trackers(names)
    ids_path = root / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
    run_name = str(recipe.get("name", root.name))
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(root, resume_step))
        elif name == "mlflow":
            trackers.append(MlflowTracker(root, run_name, flatten(recipe), ids.get("mlflow")))
        elif name == "wandb":
            trackers.append(WandbTracker(root, run_name, recipe, ids.get("wandb")))
    kept = {name: t.run_id for name, t in zip(names, trackers) if hasattr(t, "run_id")}
    if kept:
        ids_path.write_text(json.dumps(kept, indent=1) + "\n")
    return trackers


def numeric_leaves(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """{"eval/tuned/fact_accuracy": 60.4, ...}: the numbers of a nested report (lists and text left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(numeric_leaves(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # not NaN
            out[f"{prefix}{key}"] = float(value)
    return out


def report_eval(names: Sequence[str], root: Path, recipe: dict[str, Any], report: dict[str, Any], step: int) -> None:
    """`afina eval`'s numbers (`eval/<system>/<metric>`, at the last training step) and its report and metrics
    files, into the same tracker runs as the training (their ids in <run>/trackers.json)."""
    if not names:
        return
    metrics = numeric_leaves(report.get("systems") or {}, "eval/")
    artifacts = [path for path in EVAL_ARTIFACTS if (root / path).is_file()]
    for tracker in open_trackers(names, root, recipe, resume_step=step):
        if metrics:
            tracker.log_metrics(metrics, step)
        tracker.log_artifacts(root, artifacts)
        tracker.close(failed=False)
