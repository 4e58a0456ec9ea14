"""Compare base, few-shot, RAG, tuned and tuned+RAG on slices of ../shared/data with the default model.

    flock /tmp/afina-bench.lock python bench/eval_compare.py --tasks qa summ mt code --rows 160 --test 16 --steps 20

Each task: write a slice of the shared file as afina chat rows, then `afina` prepare -> train -> eval
(no export). Prints each task's systems x metrics table and writes bench/results/<task>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from afina.config import load_recipe
from afina.eval.summary import format_table
from afina.pipeline import evaluate, prepare, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read(name: str, n: int) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def chat(row_id, system, prompt, answer, **extra):
    return {
        "id": str(row_id),
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def task_rows(task: str, n: int) -> tuple[list[dict], list[str]]:
    """Rows in afina's chat form, and the task's recipe overrides."""
    if task == "qa":
        rows = [
            chat(r["id"], "Answer the question with a short phrase.", r["question"], r["answers"][0])
            for r in read("qa_xquad_en.jsonl", n)
        ]
        return rows, [
            "eval.metrics=[exact_match,token_f1,perplexity]",
            "eval.max_new_tokens=24",
            f"eval.rag.corpus={DATA / 'qa_xquad_en_passages.jsonl'}",
            "eval.rag.top_k=2",
            "eval.rag.max_passage_chars=900",
        ]
    if task == "summ":
        rows = [
            chat(
                r["id"],
                "Summarize the dialogue in one or two sentences.",
                r["document"],
                r["summary"],
                references=r["references"],
            )
            for r in read("summarization_dialogsum_test.jsonl", n)
        ]
        return rows, [
            "eval.metrics=[rouge,perplexity]",
            "eval.max_new_tokens=60",
            "eval.few_shot.k=1",
            "eval.rag.top_k=1",
            "eval.rag.max_passage_chars=1200",
            "data.max_length=1024",
        ]
    if task == "mt":
        rows = [
            chat(r["id"], "Translate the English text into Spanish. Reply with the translation only.", r["en"], r["es"])
            for r in read("translation_ntrex128_en_es.jsonl", n)
        ]
        return rows, [
            "eval.metrics=[bleu,chrf,perplexity]",
            "eval.max_new_tokens=80",
            "eval.few_shot.k=2",
            "eval.rag.top_k=2",
        ]
    if task == "code":
        rows = []
        for r in read("code_mbpp.jsonl", 1000):
            if r["split"] not in ("train", "test"):
                continue
            prompt = f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}\nReply with Python code only."
            rows.append(
                chat(
                    r["task_id"],
                    "You are a Python programmer.",
                    prompt,
                    "```python\n" + r["code"].replace("\r\n", "\n").strip() + "\n```",
                    tests=r["test_list"],
                    test_setup=r["test_setup_code"],
                )
            )
        return rows[:n], [
            "eval.metrics=[pass@1,perplexity]",
            "eval.max_new_tokens=160",
            "eval.few_shot.k=2",
            "eval.rag.top_k=2",
            "data.max_length=768",
        ]
    raise SystemExit(f"unknown task {task}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["qa", "summ", "mt", "code"])
    parser.add_argument("--rows", type=int, default=160, help="rows taken from each file (train + validation + test)")
    parser.add_argument("--test", type=int, default=16, help="test examples scored per system")
    parser.add_argument("--steps", type=int, default=20, help="LoRA optimizer steps")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra recipe overrides applied last (e.g. eval.max_new_tokens=48)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        rows, overrides = task_rows(task, args.rows)
        data = out / f"{task}.data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        recipe = load_recipe(
            None,
            [
                f"name=bench-{task}",
                f"output_dir={out / 'runs'}",
                f"data.path={data.resolve()}",
                "data.split.train=0.75",
                "data.split.validation=0.05",
                "data.split.test=0.2",
                f"training.max_steps={args.steps}",
                "training.batch_size=4",
                "training.learning_rate=5e-4",
                "training.log_every=2",
                f"eval.max_examples={args.test}",
                "eval.batch_size=8",
                "eval.price_per_hour=1.0",
                "eval.forgetting.max_questions=40",
                *overrides,
                *args.set,
            ],
        )
        start = time.perf_counter()
        from afina.rundir import RunDir

        run = RunDir(recipe.run_dir)
        with run.stage("prepare", recipe.to_dict(), recipe.seed):
            prepare(recipe)
        with run.stage("train", recipe.to_dict(), recipe.seed):
            train(recipe, progress=False)
        report = evaluate(recipe, progress=False)
        print(
            f"\n=== {task}: {len(rows)} rows, {report['test_examples']} test examples, {args.steps} LoRA steps, "
            f"{time.perf_counter() - start:.0f} s"
        )
        print(format_table(report))
        eff = report["efficiency"]
        for s in report["systems"]:
            print(
                f"  {s:>13}: p50 {eff[s]['latency_p50_s']:.2f}s p95 {eff[s]['latency_p95_s']:.2f}s/batch, "
                f"{eff[s]['generated_tokens_per_s']:.1f} tok/s, "
                f"peak {eff[s]['peak_memory_mb']:.0f} MiB, cost/1k {eff[s]['cost_per_1k_requests']:.4f}"
            )
        print("  training:", report["training"])
        print("  recommendation:", " ".join(report["recommendation"]))
        (out / f"{task}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
