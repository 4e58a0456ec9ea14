"""`afina eval`: the base model and the tuned model answer the same held-out test split."""

from __future__ import annotations

import contextlib
from typing import Any

from afina.config import Recipe
from afina.device import autocast_factory, pick_device, resolve_precision
from afina.eval.generate import generate_answers
from afina.eval.metrics import contains_all, exact_match, key_recall, perplexity, rouge_l
from afina.rundir import RunDir, read_jsonl, write_json_atomic, write_jsonl
from afina.train.loop import encode_split
from afina.train.loss import mean_label_loss

METRIC_LABELS = {
    "fact_accuracy": "fact accuracy (%)",
    "fact_recall": "key facts found (%)",
    "rougeL": "ROUGE-L F1",
    "exact_match": "exact match (%)",
    "answer_loss": "answer loss (nats/token)",
    "answer_perplexity": "answer perplexity",
}


def load_tuned(recipe: Recipe, run: RunDir, device):
    """The trained model: base + LoRA adapter (with the adapter switchable), or the full model."""
    from afina.models import load_model

    if recipe.method.type == "full":
        return load_model(str(run.require(run.model, "train")), "float32").to(device)
    from peft import PeftModel

    base = load_model(recipe.model.name, "float32")
    return PeftModel.from_pretrained(base, str(run.require(run.adapter, "train"))).to(device).eval()


def score_system(rows, answers, loss) -> dict[str, float]:
    references = [row["messages"][-1]["content"] for row in rows]
    scores: dict[str, float] = {}
    keyed = [(row["must_include"], a) for row, a in zip(rows, answers) if row.get("must_include")]
    if keyed:
        scores["fact_accuracy"] = 100.0 * sum(contains_all(a, k) for k, a in keyed) / len(keyed)
        scores["fact_recall"] = 100.0 * sum(key_recall(a, k) for k, a in keyed) / len(keyed)
    scores["rougeL"] = rouge_l(answers, references)
    scores["exact_match"] = exact_match(answers, references)
    scores["answer_loss"] = loss
    scores["answer_perplexity"] = perplexity(loss)
    return {k: round(v, 4) for k, v in scores.items()}


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    from afina.models import load_model, load_tokenizer

    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name)
    rows = read_jsonl(run.require(run.split_path("test"), "prepare"))
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    if not rows:
        raise ValueError(f"{run.split_path('test')} has no rows: set data.split.test above 0")
    encoded = encode_split(tokenizer, rows, "assistant")
    prompts = [row["messages"][:-1] for row in rows]

    tuned = load_tuned(recipe, run, device) if "tuned" in cfg.systems else None
    results: dict[str, dict[str, float]] = {}
    predictions: list[dict[str, Any]] = []
    for system in cfg.systems:
        if system == "base" and tuned is not None and hasattr(tuned, "disable_adapter"):
            model, context = tuned, tuned.disable_adapter  # the same weights with the adapter switched off
        elif system == "base":
            model, context = load_model(recipe.model.name, "float32").to(device), contextlib.nullcontext
        else:
            model, context = tuned, contextlib.nullcontext
        with context():
            answers = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, autocast, desc=f"eval {system}", progress=progress)
            loss = mean_label_loss(model, encoded, tokenizer.pad_token_id, cfg.batch_size, autocast)
        results[system] = score_system(rows, answers, loss)
        for row, answer in zip(rows, answers):
            predictions.append(
                {
                    "id": row["id"],
                    "system": system,
                    "question": row["messages"][-2]["content"],
                    "reference": row["messages"][-1]["content"],
                    "prediction": answer,
                    **({"correct": contains_all(answer, row["must_include"])} if row.get("must_include") else {}),
                }
            )
    report = {"test_examples": len(rows), "systems": results}
    write_jsonl(run.eval / "predictions.jsonl", predictions)
    write_json_atomic(run.eval / "metrics.json", report)
    run.update_manifest(eval=report)
    return report


def format_table(report: dict[str, Any]) -> str:
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if all(m in report["systems"][s] for s in systems)]
    width = max(len(METRIC_LABELS[m]) for m in metrics)
    head = f"{'metric'.ljust(width)}  " + "  ".join(s.rjust(10) for s in systems)
    lines = [f"test split: {report['test_examples']} examples", head, "-" * len(head)]
    for m in metrics:
        lines.append(f"{METRIC_LABELS[m].ljust(width)}  " + "  ".join(f"{report['systems'][s][m]:10.2f}" for s in systems))
    return "\n".join(lines)
