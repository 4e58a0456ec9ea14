"""Preference tuning, measured: preference accuracy on held-out HH-RLHF pairs before and after, time, memory.

Runs `afina prepare`, `afina train` and `afina eval` on examples/preference_hh.yaml (the default model,
LoRA, ../shared/data/preference_hh_harmless.jsonl: held-out 10% of the pairs), once per --loss, each stage
in its own process (so each peak memory is its own), and prints a table; results in <out>/results.json.

    flock /tmp/afina-bench.lock python bench/bench_preference.py --loss dpo orpo --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "preference_hh.yaml"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage(name: str, overrides: list[str]) -> dict[str, float]:
    """One `afina` stage in a child process: its wall time and peak resident memory."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "afina", name, str(RECIPE), *overrides])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"afina {name} failed with exit code {proc.returncode}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", nargs="+", default=["dpo", "orpo"], choices=["dpo", "ipo", "orpo", "simpo", "kto"])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of 4 pairs each")
    parser.add_argument("--test-pairs", type=int, default=None, help="score at most this many held-out pairs")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_preference"))
    parser.add_argument("overrides", nargs="*", help="more recipe overrides")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for loss in args.loss:
        overrides = [
            f"name=preference_{loss}",
            f"output_dir={out}",
            f"preference.loss={loss}",
            f"training.max_steps={args.steps}",
            *args.overrides,
        ]
        if args.test_pairs:
            overrides.append(f"eval.max_examples={args.test_pairs}")
        times = {}
        for name in ("prepare", "train", "eval"):
            if name == "prepare" and loss != args.loss[0]:  # the same data and split for every loss
                import shutil

                (out / f"preference_{loss}").mkdir(parents=True, exist_ok=True)
                shutil.copytree(
                    out / f"preference_{args.loss[0]}" / "data", out / f"preference_{loss}" / "data", dirs_exist_ok=True
                )
                continue
            log(f"{loss}: afina {name}")
            times[name] = stage(name, overrides)
        run = out / f"preference_{loss}"
        manifest = json.loads((run / "manifest.json").read_text())
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        results[loss] = {
            "stages": times,
            "train": {
                k: manifest["train"].get(k)
                for k in (
                    "steps",
                    "train_examples",
                    "tokens",
                    "tokens_per_s",
                    "val_loss_before",
                    "val_loss_after",
                    "peak_memory_mb",
                    "precision",
                    "beta",
                )
            },
            "test_pairs": metrics["test_examples"],
            "systems": metrics["systems"],
            "forgetting": metrics.get("forgetting"),
        }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{'loss':<6} {'pairs':>5} {'acc base':>8} {'acc tuned':>9} {'per-token':>15} {'reward margin':>13} "
        f"{'train s':>7} {'train MB':>8} {'probe':>13}"
    )
    for loss, r in results.items():
        b, t = r["systems"]["base"], r["systems"]["tuned"]
        f = r["forgetting"] or {}
        print(
            f"{loss:<6} {r['test_pairs']:>5} {b['preference_accuracy']:>8.1f} {t['preference_accuracy']:>9.1f} "
            f"{b['preference_accuracy_per_token']:>6.1f} -> {t['preference_accuracy_per_token']:>5.1f} "
            f"{t['reward_margin']:>13.3f} {r['stages']['train']['wall_s']:>7.0f} "
            f"{r['stages']['train']['peak_rss_mb']:>8.0f} "
            f"{f.get('base_accuracy', 0):>5.1f}->{f.get('tuned_accuracy', 0):>5.1f}"
        )
    print(os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
