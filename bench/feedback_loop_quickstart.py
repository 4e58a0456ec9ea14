"""The loop end to end on the quickstart: serve, collect ratings and corrections, DPO, promote; fact accuracy per round.

Round 0 is the quickstart (SFT with LoRA, merged for the next round). Then, per round: the served model
answers the questions of the train and validation splits through the real HTTP server (`--log-dir`); a
script rates each answer by its `must_include` facts (all there: +1; else -1 with the reference answer as
the correction) over /v1/feedback; `afina data from-logs --pairs` turns the log into pairs; a DPO run over
the merged model trains on them, is evaluated on round 0's frozen test split (preference.task_test) and
goes through `afina promote` against the serving run. The test questions are never sent (no leak).

    flock /tmp/afina-bench.lock python bench/feedback_loop_quickstart.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def serve_and_rate(run_root: Path, rows: list[dict], log_dir: Path) -> float:
    """Serve the run, ask every row's question, rate (and correct) each answer by its facts; the fact accuracy."""
    import httpx
    import uvicorn

    from afina.config import ServeConfig
    from afina.eval.generative import contains_all
    from afina.serve.app import create_app
    from afina.serve.models import load_served

    app = create_app(load_served(str(run_root)), ServeConfig(log_dir=str(log_dir), max_tokens=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    correct = 0
    try:
        for row in rows:
            reply = httpx.post(
                f"{base}/v1/chat/completions", timeout=600, json={"messages": row["messages"][:-1], "max_tokens": 64}
            ).json()
            answer = reply["choices"][0]["message"]["content"]
            good = contains_all(answer, row["must_include"])
            correct += good
            feedback = {"id": reply["id"], "rating": 1 if good else -1}
            if not good:
                feedback["correction"] = row["messages"][-1]["content"]
            httpx.post(f"{base}/v1/feedback", json=feedback, timeout=60).raise_for_status()
    finally:
        server.should_exit = True
    return 100.0 * correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "feedback_loop"))
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--max-traffic", type=int, help="send at most this many questions per round")
    parser.add_argument("overrides", nargs="*", help="overrides for every round's recipe (e.g. model.name=...)")
    args = parser.parse_args()
    from afina.config import load_recipe
    from afina.data.preference_logs import format_preference_counts, preferences_from_logs
    from afina.eval.promote import format_promotion, promote
    from afina.pipeline import bundled_recipe_path, run_all
    from afina.rundir import RunDir, read_jsonl

    out = Path(args.out)
    common = [f"output_dir={out}", "eval.systems=[base,tuned]", *args.overrides]
    log("round 0: the quickstart (SFT)")
    current = load_recipe(bundled_recipe_path("quickstart"), ["name=round0", "export.formats=[merged]", *common])
    results = [
        {
            "round": 0,
            "run": "round0",
            "test_fact_accuracy": run_all(current)["eval"]["systems"]["tuned"]["fact_accuracy"],
        }
    ]
    frozen_test = RunDir(current.run_dir).split_path("test")
    traffic = [
        r
        for split in ("train", "validation")
        for r in read_jsonl(RunDir(current.run_dir).split_path(split))
        if r.get("must_include")
    ][: args.max_traffic]
    serving_run = RunDir(current.run_dir)
    for n in range(1, args.rounds + 1):
        log(f"round {n}: serve {serving_run.root.name}, rate {len(traffic)} answers")
        logs = out / f"logs{n}"
        served_accuracy = serve_and_rate(serving_run.root, traffic, logs)
        counts = preferences_from_logs(logs, out / f"pairs{n}.jsonl")
        log(format_preference_counts(counts))
        merged = serving_run.root / "export" / "merged"
        recipe = load_recipe(
            None,
            [
                f"name=round{n}",
                "task=preference",
                f"model.name={merged}",
                f"data.path={out / f'pairs{n}.jsonl'}",
                "data.split.train=0.8",
                "data.split.validation=0.1",
                "data.split.test=0.1",
                "data.max_length=384",
                "preference.loss=dpo",
                "preference.beta=0.1",
                f"preference.task_test={frozen_test}",
                f"training.max_steps={args.dpo_steps}",
                "training.batch_size=4",
                "training.learning_rate=2e-4",
                "eval.max_new_tokens=48",
                "eval.batch_size=24",
                "export.formats=[merged]",
                *common,
            ],
        )
        result = run_all(recipe)
        decision = promote(recipe.run_dir, serving_run.root)
        print(format_promotion(decision))
        systems = result["eval"]["systems"]
        results.append(
            {
                "round": n,
                "run": f"round{n}",
                "served_fact_accuracy": served_accuracy,
                "pairs": counts["pairs_written"],
                "test_fact_accuracy": systems["tuned"]["fact_accuracy"],
                "preference_accuracy": [
                    systems["base"]["preference_accuracy"],
                    systems["tuned"]["preference_accuracy"],
                ],
                "promoted": decision["promoted"],
            }
        )
        if decision["promoted"]:
            serving_run = RunDir(recipe.run_dir)
    (out / "loop.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps(r))
    print(os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
