"""What a person watches during training: metrics.jsonl, TensorBoard events and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TrainingMonitor:
    def __init__(self, root: Path, metrics_path: Path, resume_step: int | None, tensorboard: bool, plots: bool):
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
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                log_dir=str(root / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None
            )

    @classmethod
    def silent(cls) -> TrainingMonitor:
        """For the non-main processes of a distributed run: records nothing."""
        monitor = cls.__new__(cls)
        monitor.records, monitor.file, monitor.writer, monitor.plot_path = [], None, None, None  # type: ignore[assignment]
        return monitor

    def log(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(
                        f"train/{key}" if key != "val_loss" else "validation/loss", value, record["step"]
                    )
            self.writer.flush()

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

    def close(self) -> None:
        self.plot()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
