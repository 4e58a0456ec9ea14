"""What a person watches during training: metrics.jsonl, PNG plots and the trackers of `training.report_to`
(TensorBoard, MLflow, W&B: afina.train.trackers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afina.train.trackers import ARTIFACTS, Tracker, metric_name, open_trackers


class TrainingMonitor:
    def __init__(
        self,
        root: Path,
        metrics_path: Path,
        resume_step: int | None,
        report_to: Sequence[str],
        plots: bool,
        recipe: dict[str, Any] | None = None,
    ):
        self.root = root
        self.metrics_path = metrics_path
        self.plot_path = root / "plots" / "training.png" if plots else None
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and metrics_path.is_file():
            # Keep the curve up to the checkpoint; the resumed run writes the rest again.
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= resume_step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            metrics_path.unlink(missing_ok=True)
        self.file = metrics_path.open("a", encoding="utf-8")
        self.trackers: list[Tracker] = open_trackers(report_to, root, recipe or {}, resume_step)

    @classmethod
    def silent(cls) -> TrainingMonitor:
        """For the non-main processes of a distributed run: records nothing."""
        monitor = cls.__new__(cls)
        monitor.records, monitor.file, monitor.trackers, monitor.plot_path = [], None, [], None  # type: ignore[assignment]
        return monitor

    def log(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        metrics = {
            metric_name(key): value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for tracker in self.trackers:
            tracker.log_metrics(metrics, record["step"])

    def plot(self) -> None:
        """Rewrite the loss and learning-rate plot (called after each validation and at the end)."""
        if self.plot_path is None or not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.records]
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax_loss.plot(steps, [r["loss"] for r in self.records], label="train loss", color="#1f77b4")
        if val:
            ax_loss.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_lr.plot(steps, [r["lr"] for r in self.records], color="#2ca02c")
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        self.plot_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.plot_path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.plot_path)

    def close(self, failed: bool = False) -> None:
        """The last plot, then the plots and reports handed to the trackers as artifacts."""
        self.plot()
        if self.file is not None:
            self.file.close()
        if self.trackers:
            artifacts = [path for path in ARTIFACTS if (self.root / path).is_file()]
            for tracker in self.trackers:
                tracker.log_artifacts(self.root, artifacts)
                tracker.close(failed)
