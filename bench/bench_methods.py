"""Each fine-tuning method on the real default model: does validation loss go down, at what cost?

    python bench/bench_methods.py --steps 15

Trains on the quickstart data (bundled) for a few steps with lora, qlora, dora and full, and
prints validation loss before/after, trainable parameters, tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "lora": ["method.type=lora"],
    "dora": ["method.type=lora", "method.dora=true"],
    "qlora": ["method.type=qlora"],
    "full": ["method.type=full", "training.learning_rate=5e-5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    base = [
        "training.report_to=[]",
        "training.plots=false",
        f"training.max_steps={args.steps}",
        f"output_dir={out}",
    ]
    recipe = Path(__file__).resolve().parents[1] / "src" / "afina" / "recipes" / "quickstart.yaml"
    subprocess.run(
        [sys.executable, "-m", "afina", "prepare", str(recipe), *base, "name=prep"], check=True, capture_output=True
    )
    rows = []
    for name, overrides in METHODS.items():
        run = out / name
        run.mkdir()
        (run / "data").symlink_to(out / "prep" / "data")
        subprocess.run(
            [sys.executable, "-m", "afina", "train", str(recipe), *base, f"name={name}", *overrides], check=True
        )
        summary = json.loads((run / "manifest.json").read_text())["train"]
        rows.append((name, summary))
    print(f"\n{args.steps} steps on the quickstart data, default model, this CPU")
    print(f"{'method':8}{'trainable':>14}{'val before':>12}{'val after':>11}{'tokens/s':>10}{'peak MB':>9}")
    for name, s in rows:
        print(
            f"{name:8}{s['trainable_parameters']:>14,}{s['val_loss_before']:>12.3f}{s['val_loss_after']:>11.3f}"
            f"{s['tokens_per_s']:>10.0f}{s['peak_memory_mb']:>9.0f}"
        )


if __name__ == "__main__":
    main()
