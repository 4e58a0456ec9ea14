"""The README's table for a finished `afina run` of a use-case recipe: systems x metrics (with the 95%
bootstrap interval), latency, cost per 1,000 requests, training time and peak memory, and the
recommendation afina printed, read from RUN/eval/metrics.json and RUN/manifest.json.

    python bench/use_case_tables.py runs/uc-summaries runs/uc-translation ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from afina.eval.summary import METRIC_LABELS  # noqa: E402

SKIP = {"fact_recall", "answer_loss", "answer_perplexity", "rouge2", "reference_words_mean"}


def stage_seconds(manifest: dict, stage: str) -> float | None:
    return manifest.get("stages", {}).get(stage, {}).get("wall_time_s")


def table(run: Path) -> str:
    report = json.loads((run / "eval" / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if m not in SKIP and all(m in report["systems"][s] for s in systems)]
    intervals = (report.get("intervals") or {}).get("systems", {})

    def cell(system: str, metric: str) -> str:
        value = report["systems"][system][metric]
        interval = intervals.get(system, {}).get(metric)
        return f"{value:.1f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")

    lines = [
        f"`{run.name}`: {report['test_examples']} test rows",
        "",
        "| | " + " | ".join(systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    lines += [f"| {METRIC_LABELS[m]} | " + " | ".join(cell(s, m) for s in systems) + " |" for m in metrics]
    efficiency = report.get("efficiency", {})
    if efficiency:
        lines.append(
            "| latency p50 (s per batch) | "
            + " | ".join(f"{efficiency[s]['latency_p50_s']:.2f}" for s in systems)
            + " |"
        )
        lines.append(
            "| cost per 1,000 requests (USD) | "
            + " | ".join(f"{efficiency[s]['cost_per_1k_requests']:.4f}" for s in systems)
            + " |"
        )
    forgetting = report.get("forgetting")
    training = report.get("training", {})
    stages = ", ".join(
        f"{stage} {seconds / 60:.1f} min"
        for stage in ("prepare", "train", "eval", "export")
        if (seconds := stage_seconds(manifest, stage)) is not None
    )
    lines += [
        "",
        f"Training: {training.get('steps')} steps, peak memory {training.get('peak_memory_mb') or 0:,.0f} MB, "
        f"cost {training.get('cost') or 0:.4f} USD. Stages: {stages}."
        + (
            f" Forgetting probe: {forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f}"
            f"{' (flagged)' if forgetting['flagged'] else ''}."
            if forgetting
            else ""
        ),
        "",
        "afina's recommendation: " + recommendation(report.get("recommendation", [])),
    ]
    return "\n".join(lines)


def recommendation(sentences: list[str]) -> str:
    """The verdict on fine-tuning against prompting, and whether the test split can tell them apart."""
    verdict = next((s for s in sentences if s.startswith("Fine-tuning (tuned)")), None)
    if verdict is None:
        return " ".join(sentences[:2])
    rival = verdict.split("(")[2].split(")")[0]  # "... the best prompting-only system (base_rag) by ..."
    difference = next((s for s in sentences if s.startswith(f"tuned - {rival} ")), "")
    return f"{verdict} {difference}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("\n\n".join(table(run) for run in args.runs))


if __name__ == "__main__":
    main()
