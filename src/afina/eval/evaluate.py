"""`afina eval`: did fine-tuning help, compared with prompting and RAG, at what cost, and what did it forget?

Every system answers the same held-out test split with the same metrics:

    base          the base model, zero-shot
    base_fewshot  the base model with k train examples in the prompt (random or most similar)
    base_rag      the base model with the top-k retrieved passages in the prompt
    tuned         the fine-tuned model
    tuned_rag     the fine-tuned model with the same retrieved passages

Then a forgetting probe (multiple choice, scored by log-likelihood) for base and tuned, the cost
of each system (latency, tokens/s, memory, cost per 1,000 requests) and eval/report.html.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from typing import Any

from afina.config import Recipe
from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
from afina.eval.generate import generate_timed
from afina.eval.metrics import (
    bleu,
    classification_scores,
    contains_all,
    chrf,
    exact_match,
    key_recall,
    perplexity,
    rouge_scores,
    sentence_chrf,
    token_f1,
    token_f1_one,
)
from afina.eval.sample import eval_rows
from afina.rundir import RunDir, read_jsonl, write_json_atomic, write_jsonl
from afina.train.loop import encode_split
from afina.train.loss import label_loss_sum

METRIC_LABELS = {
    "fact_accuracy": "fact accuracy (%)",
    "fact_recall": "key facts found (%)",
    "accuracy": "accuracy (%)",
    "macro_f1": "macro-F1 (%)",
    "pass@1": "pass@1 (%)",
    "exact_match": "exact match (%)",
    "token_f1": "token F1 (%)",
    "rouge1": "ROUGE-1 F1",
    "rouge2": "ROUGE-2 F1",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU",
    "chrf": "chrF",
    "entity_f1": "entity F1 (%)",
    "entity_precision": "entity precision (%)",
    "entity_recall": "entity recall (%)",
    "answer_loss": "answer loss (nats/token)",
    "answer_perplexity": "answer perplexity",
    "domain_loss": "domain loss (nats/token)",
    "domain_perplexity": "domain perplexity",
    "general_loss": "general-text loss (nats/token)",
    "general_perplexity": "general-text perplexity",
}
LOWER_IS_BETTER = {"answer_loss", "answer_perplexity", "domain_loss", "domain_perplexity", "general_loss", "general_perplexity"}
# The metric that decides "best system" and "worst examples", first one present wins.
PRIMARY_METRICS = ("pass@1", "entity_f1", "accuracy", "fact_accuracy", "token_f1", "rougeL", "chrf", "bleu", "exact_match", "answer_loss")
TUNED_SYSTEMS = ("tuned", "tuned_rag")


def load_tuned(recipe: Recipe, run: RunDir, device):
    """The trained model: base + LoRA adapter (with the adapter switchable), or the full model."""
    from afina.models import load_model

    if recipe.method.type == "full":
        return load_model(str(run.require(run.model, "train")), "float32").to(device)
    from peft import PeftModel

    from afina.models.rope import read_rope_settings

    adapter = run.require(run.adapter, "train")
    base = load_model(recipe.model.name, "float32", rope=read_rope_settings(adapter))  # the positions it was trained with
    return PeftModel.from_pretrained(base, str(adapter)).to(device).eval()


def resolve_metrics(requested: list[str] | str, rows: list[dict[str, Any]]) -> list[str]:
    """The metric families to compute; `auto` picks by what the rows carry."""
    if requested != "auto":
        if "pass@1" in requested and not all(row.get("tests") for row in rows):
            missing = next(row["id"] for row in rows if not row.get("tests"))
            raise ValueError(f"eval.metrics has pass@1 but test row {missing!r} has no `tests` (Python assert lines)")
        return list(requested)
    if all(row.get("tests") for row in rows):
        return ["pass@1", "perplexity"]
    chosen = ["facts"] if any(row.get("must_include") for row in rows) else []
    return chosen + ["rouge", "exact_match", "token_f1", "perplexity"]


def references_of(row: dict[str, Any]) -> list[str]:
    return [row["messages"][-1]["content"], *[r for r in row.get("references", []) if r != row["messages"][-1]["content"]]]


def last_user_text(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


# ---- prompts of each system -------------------------------------------------------------------


def few_shot_prompts(rows, train_rows, k: int, selection: str, seed: int) -> list[list[dict[str, str]]]:
    """Each test prompt preceded by k solved train examples as earlier turns of the chat."""
    if not train_rows:
        raise ValueError("base_fewshot needs train examples, but the train split is empty")
    k = min(k, len(train_rows))
    if selection == "similar":
        import torch

        from afina.rag.index import embed

        train_vectors = embed([last_user_text(r["messages"][:-1]) for r in train_rows])
        test_vectors = embed([last_user_text(r["messages"][:-1]) for r in rows])
        # Most similar last, right before the question (recency helps small models).
        picks = [list(reversed(p)) for p in torch.topk(test_vectors @ train_vectors.T, k=k, dim=1).indices.tolist()]
    else:
        rng = random.Random(seed)
        picks = [rng.sample(range(len(train_rows)), k) for _ in rows]
    prompts = []
    for row, pick in zip(rows, picks):
        messages = row["messages"][:-1]
        system = [messages[0]] if messages[0]["role"] == "system" else []
        shots = []
        for i in pick:
            example = [m for m in train_rows[i]["messages"] if m["role"] != "system"]
            shots += example
        prompts.append(system + shots + messages[len(system) :])
    return prompts


def rag_prompts(recipe: Recipe, rows, train_rows) -> tuple[list[list[dict[str, str]]], list[list[str]]]:
    """Each test prompt with the top-k passages retrieved for its question; also the passage ids."""
    from afina.rag.index import Retriever, load_passages, passages_from_rows

    cfg = recipe.eval.rag
    if cfg.corpus:
        passages = load_passages(recipe.resolve_path(cfg.corpus))
    elif train_rows:
        passages = passages_from_rows(train_rows)
    else:
        raise ValueError("RAG needs a corpus: set eval.rag.corpus to a passage file, or give the run a train split")
    retriever = Retriever(passages, cfg.retriever)
    questions = [last_user_text(row["messages"][:-1]) for row in rows]
    hits = retriever.search(questions, cfg.top_k)
    prompts = []
    for row, question, found in zip(rows, questions, hits):
        context = "\n\n".join(
            f"[{n}] {(p.title + ': ') if p.title else ''}{p.text[: cfg.max_passage_chars]}" for n, p in enumerate(found, 1)
        )
        content = f"Context:\n{context}\n\nUse the context above if it helps.\n\n{question}"
        messages = [dict(m) for m in row["messages"][:-1]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last] = {"role": "user", "content": content}
        prompts.append(messages)
    return prompts, [[p.id for p in found] for found in hits]


# ---- scoring ------------------------------------------------------------------------------------


def score_system(rows, answers: list[str], loss: float | None, metrics: list[str], sandbox_cfg=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus scores of one system, and per-example scores (for the worst-examples list)."""
    references = [references_of(row) for row in rows]
    scores: dict[str, Any] = {}
    per_example: list[dict[str, Any]] = [{} for _ in rows]
    if "facts" in metrics:
        keyed = [(i, row["must_include"]) for i, row in enumerate(rows) if row.get("must_include")]
        if keyed:
            for i, keys in keyed:
                per_example[i]["correct"] = contains_all(answers[i], keys)
            scores["fact_accuracy"] = 100.0 * sum(per_example[i]["correct"] for i, _ in keyed) / len(keyed)
            scores["fact_recall"] = 100.0 * sum(key_recall(answers[i], k) for i, k in keyed) / len(keyed)
    if "classification" in metrics:
        result = classification_scores(answers, [r[0] for r in references])
        scores["accuracy"], scores["macro_f1"] = result["accuracy"], result["macro_f1"]
        scores["confusion"] = result["confusion"]
        for i, label in enumerate(result["predicted"]):
            per_example[i]["predicted_label"], per_example[i]["correct"] = label, label == references[i][0]
    if "pass@1" in metrics:
        from afina.eval.sandbox import extract_code, program_for_task, run_program

        limits = {"time_limit_s": sandbox_cfg.time_limit_s, "memory_mb": sandbox_cfg.memory_mb} if sandbox_cfg else {}
        for i, row in enumerate(rows):
            program = program_for_task(extract_code(answers[i]), row["tests"], row.get("test_setup", ""))
            result = run_program(program, **limits)
            per_example[i]["passed"], per_example[i]["sandbox"] = result.passed, result.status
        scores["pass@1"] = 100.0 * sum(e["passed"] for e in per_example) / len(rows)
    if "exact_match" in metrics:
        scores["exact_match"] = exact_match(answers, [r[0] for r in references])
    if "token_f1" in metrics:
        scores["token_f1"] = token_f1(answers, references)
        for i in range(len(rows)):
            per_example[i]["token_f1"] = round(100.0 * max(token_f1_one(answers[i], r) for r in references[i]), 2)
    if "rouge" in metrics:
        scores.update(rouge_scores(answers, references))
    if "bleu" in metrics:
        scores["bleu"] = bleu(answers, references)
    if "chrf" in metrics:
        scores["chrf"] = chrf(answers, references)
        for i in range(len(rows)):
            per_example[i]["chrf"] = round(sentence_chrf(answers[i], references[i]), 2)
    if "perplexity" in metrics and loss is not None:
        scores["answer_loss"] = loss
        scores["answer_perplexity"] = perplexity(loss)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}, per_example


def efficiency_of(generation, n: int, peak_mb: float, price_per_hour: float) -> dict[str, float]:
    import numpy as np

    seconds_per_request = generation.wall_s / max(n, 1)
    return {
        "latency_p50_s": round(float(np.percentile(generation.latency_s, 50)), 4),
        "latency_p95_s": round(float(np.percentile(generation.latency_s, 95)), 4),
        "generated_tokens_per_s": round(sum(generation.new_tokens) / max(generation.wall_s, 1e-9), 2),
        "mean_new_tokens": round(statistics.fmean(generation.new_tokens), 2),
        "wall_s": round(generation.wall_s, 3),
        "peak_memory_mb": round(peak_mb, 1),
        "cost_per_1k_requests": round(price_per_hour * seconds_per_request * 1000 / 3600, 6),
    }


def primary_metric(systems: dict[str, dict[str, Any]]) -> str | None:
    common = set.intersection(*(set(s) for s in systems.values())) if systems else set()
    return next((m for m in PRIMARY_METRICS if m in common), None)


# ---- the stage --------------------------------------------------------------------------------


def tasks_of(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Multi-task test rows: the row indices of each task, in order of first appearance ({} for one task)."""
    if not any("task" in row for row in rows):
        return {}
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get("task")), []).append(i)
    return groups


def per_task(rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], make) -> list[Any]:
    """make(test rows, train rows) for each task apart (few-shot examples come from the row's own task)."""
    groups = tasks_of(rows)
    if not groups:
        return make(rows, train_rows)
    out: list[Any] = [None] * len(rows)
    for task, indices in groups.items():
        # An upsampled task repeats train rows in the mixture; each is one example here.
        own = list({r["id"]: r for r in train_rows if r.get("task") == task}.values())
        made = make([rows[i] for i in indices], own)
        for i, item in zip(indices, made):
            out[i] = item
    return out


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    from afina.models import load_model, load_tokenizer

    if recipe.task == "domain":
        from afina.eval.domain import evaluate_domain

        return evaluate_domain(recipe, progress)
    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name)
    rows = eval_rows(recipe)
    if not rows:
        raise ValueError(f"{run.split_path('test')} has no rows: set data.split.test above 0")
    train_path = run.split_path("train")
    train_rows = read_jsonl(train_path) if train_path.is_file() else []
    metrics = resolve_metrics(cfg.metrics, rows)
    tasks = tasks_of(rows)
    task_metrics = {task: resolve_metrics(cfg.metrics, [rows[i] for i in idx]) for task, idx in tasks.items()}
    by_task: dict[str, dict[str, Any]] = {task: {} for task in tasks}

    # The prompts each system sees; base_rag and tuned_rag share their retrieved passages.
    zero_shot = [row["messages"][:-1] for row in rows]
    prompts: dict[str, list[list[dict[str, str]]]] = {"base": zero_shot, "tuned": zero_shot}
    retrieved: list[list[str]] | None = None
    if "base_fewshot" in cfg.systems:
        prompts["base_fewshot"] = per_task(rows, train_rows, lambda test, train: few_shot_prompts(
            test, train, cfg.few_shot.k, cfg.few_shot.selection, recipe.seed))
    if {"base_rag", "tuned_rag"} & set(cfg.systems):
        prompts["base_rag"], retrieved = rag_prompts(recipe, rows, train_rows)
        prompts["tuned_rag"] = prompts["base_rag"]

    needs_tuned = any(s in TUNED_SYSTEMS for s in cfg.systems) or cfg.forgetting.enabled
    tuned = load_tuned(recipe, run, device) if needs_tuned else None
    base_model = None

    def model_for(system: str):
        """The model and the context it runs in: LoRA's base is the same weights with the adapter off."""
        nonlocal base_model
        if system in TUNED_SYSTEMS:
            return tuned, contextlib.nullcontext
        if tuned is not None and hasattr(tuned, "disable_adapter"):
            return tuned, tuned.disable_adapter
        if base_model is None:
            base_model = load_model(recipe.model.name, "float32").to(device)
        return base_model, contextlib.nullcontext

    results: dict[str, dict[str, Any]] = {}
    efficiency: dict[str, dict[str, float]] = {}
    predictions: list[dict[str, Any]] = []
    for system in cfg.systems:
        model, context = model_for(system)
        conversations = prompts[system]
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        with context():
            generation = generate_timed(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size, autocast, desc=f"eval {system}", progress=progress)
            loss, task_loss = None, {}
            if "perplexity" in metrics:  # the reference answer's loss given this system's own prompt
                full = [{"messages": conv + [row["messages"][-1]]} for conv, row in zip(conversations, rows)]
                sums = {task: label_loss_sum(model, encode_split(tokenizer, [full[i] for i in idx], "assistant"),
                                             tokenizer.pad_token_id, cfg.batch_size, autocast)
                        for task, idx in (tasks or {"": range(len(rows))}).items()}
                loss = sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)
                task_loss = {task: t / max(n, 1) for task, (t, n) in sums.items()}
        results[system], per_example = score_system(rows, generation.answers, loss, metrics, cfg.sandbox)
        for task, idx in tasks.items():  # the same answers, scored per task
            by_task[task][system] = score_system([rows[i] for i in idx], [generation.answers[i] for i in idx],
                                                 task_loss.get(task), task_metrics[task], cfg.sandbox)[0]
        efficiency[system] = efficiency_of(generation, len(rows), peak_memory_mb(device), cfg.price_per_hour)
        for i, (row, answer) in enumerate(zip(rows, generation.answers)):
            predictions.append(
                {
                    "id": row["id"],
                    **({"task": row["task"]} if "task" in row else {}),
                    "system": system,
                    "question": last_user_text(row["messages"][:-1]),
                    "reference": row["messages"][-1]["content"],
                    "prediction": answer,
                    **per_example[i],
                    **({"retrieved": retrieved[i]} if retrieved is not None and system.endswith("_rag") else {}),
                    "latency_s": round(generation.latency_s[i], 4),
                    "new_tokens": generation.new_tokens[i],
                }
            )

    report: dict[str, Any] = {"test_examples": len(rows), "metrics": metrics, "systems": results, "efficiency": efficiency}
    if tasks:
        report["tasks"] = {task: {"test_examples": len(idx), "metrics": task_metrics[task], "systems": by_task[task]}
                           for task, idx in tasks.items()}
    report["forgetting"] = forgetting_probe(recipe, tuned, model_for, tokenizer, autocast) if cfg.forgetting.enabled and tuned is not None else None
    report["training"] = training_cost(run, cfg.price_per_hour)
    report["recommendation"] = recommend(report)
    write_jsonl(run.eval / "predictions.jsonl", predictions)
    write_json_atomic(run.eval / "metrics.json", report)
    if cfg.report:
        from afina.eval.report import write_report

        write_report(run, report, predictions, recipe)
    run.update_manifest(eval=report)
    return report


def forgetting_probe(recipe: Recipe, tuned, model_for, tokenizer, autocast) -> dict[str, Any]:
    from afina.eval.forgetting import default_probe_path, forgetting_verdict, load_probe, probe_accuracy

    cfg = recipe.eval.forgetting
    path = recipe.resolve_path(cfg.probe) if cfg.probe else default_probe_path()
    questions = load_probe(path, cfg.max_questions)
    base_model, base_context = model_for("base")
    with base_context():
        base = probe_accuracy(base_model, tokenizer, questions, recipe.eval.batch_size, autocast)
    tuned_result = probe_accuracy(tuned, tokenizer, questions, recipe.eval.batch_size, autocast)
    verdict = forgetting_verdict(base["accuracy"], tuned_result["accuracy"], cfg.threshold)
    lost = [q["id"] for q, b, t in zip(questions, base["correct"], tuned_result["correct"]) if b and not t]
    return {"probe": str(path), "questions": len(questions), **verdict, "lost": lost[:50]}


def training_cost(run: RunDir, price_per_hour: float) -> dict[str, Any]:
    manifest = run.read_manifest()
    seconds = manifest.get("stages", {}).get("train", {}).get("wall_time_s")
    train = manifest.get("train", {})
    return {
        "wall_time_s": seconds,
        "cost": round(price_per_hour * seconds / 3600, 6) if seconds is not None else None,
        "steps": train.get("steps"),
        "trainable_parameters": train.get("trainable_parameters"),
        "peak_memory_mb": train.get("peak_memory_mb"),
    }


def recommend(report: dict[str, Any]) -> list[str]:
    """Plain sentences derived from the numbers: quality winner, cost winner, forgetting."""
    systems, efficiency = report["systems"], report["efficiency"]
    metric = primary_metric(systems)
    lines = []
    if metric:
        lower = metric in LOWER_IS_BETTER
        ranked = sorted(systems, key=lambda s: systems[s][metric], reverse=not lower)
        best = ranked[0]
        lines.append(f"Best quality on {METRIC_LABELS[metric]}: {best} ({systems[best][metric]:.2f}).")
        if "base" in systems and best != "base":
            lines.append(f"{best} vs base zero-shot: {systems[best][metric] - systems['base'][metric]:+.2f} on {METRIC_LABELS[metric]}.")
        if "tuned" in systems and {"base_fewshot", "base_rag"} & set(systems):
            prompting = max((s for s in ("base_fewshot", "base_rag") if s in systems), key=lambda s: systems[s][metric] * (-1 if lower else 1))
            delta = (systems["tuned"][metric] - systems[prompting][metric]) * (-1 if lower else 1)
            verdict = "beats" if delta > 0 else "trails"
            lines.append(f"Fine-tuning (tuned) {verdict} the best prompting-only system ({prompting}) by {abs(delta):.2f} on {METRIC_LABELS[metric]}.")
    cheapest = min(efficiency, key=lambda s: efficiency[s]["wall_s"])
    lines.append(
        f"Cheapest to serve: {cheapest} ({efficiency[cheapest]['latency_p50_s']:.3f} s p50 latency per batch, "
        f"{efficiency[cheapest]['cost_per_1k_requests']:.4f} per 1,000 requests at the recipe's price)."
    )
    forgetting = report.get("forgetting")
    if forgetting:
        if forgetting["flagged"]:
            lines.append(
                f"Forgetting: general-knowledge accuracy dropped {forgetting['drop']:.1f} points "
                f"({forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f}), beyond the {forgetting['threshold']} point threshold: "
                "lower the learning rate or epochs, use a smaller LoRA rank, or mix general data into training."
            )
        else:
            lines.append(
                f"Forgetting: not a concern ({forgetting['base_accuracy']:.1f} -> {forgetting['tuned_accuracy']:.1f} on "
                f"{forgetting['questions']} probe questions, threshold {forgetting['threshold']} points)."
            )
    return lines


def format_table(report: dict[str, Any]) -> str:
    systems = list(report["systems"])
    metrics = [m for m in METRIC_LABELS if all(m in report["systems"][s] for s in systems)]
    width = max(22, *(len(METRIC_LABELS[m]) for m in metrics))
    col = max(10, *(len(s) for s in systems))
    head = f"{'metric'.ljust(width)}  " + "  ".join(s.rjust(col) for s in systems)
    lines = [f"test split: {report['test_examples']} examples", head, "-" * len(head)]
    if not metrics:
        lines.pop()
    for m in metrics:
        lines.append(f"{METRIC_LABELS[m].ljust(width)}  " + "  ".join(f"{report['systems'][s][m]:{col}.2f}" for s in systems))
    if report.get("efficiency"):
        for key, label in (("latency_p50_s", "latency p50 (s/batch)"), ("generated_tokens_per_s", "generated tokens/s"),
                           ("examples_per_s", "examples/s")):
            if not all(key in report["efficiency"][s] for s in systems):
                continue
            lines.append(f"{label.ljust(width)}  " + "  ".join(f"{report['efficiency'][s][key]:{col}.2f}" for s in systems))
    for s in systems:  # classification: per-class recall, entities: per-type F1 (the tuned system)
        per_class = report["systems"][s].get("per_class") if s == "tuned" else None
        if per_class:
            lines.append("per class (tuned): precision / recall / support")
            for label, c in list(per_class.items())[:30]:
                fmt = lambda v: "  n/a" if v is None else f"{v:5.1f}"  # noqa: E731
                lines.append(f"  {label[:width - 2].ljust(width - 2)}  {fmt(c['precision'])} / {fmt(c['recall'])} / {c['support']}")
            if len(per_class) > 30:
                lines.append(f"  ... {len(per_class) - 30} more classes in eval/metrics.json")
        per_type = report["systems"][s].get("per_type") if s == "tuned" else None
        if per_type:
            lines.append("per entity type (tuned): precision / recall / F1 / support")
            for name, c in per_type.items():
                lines.append(f"  {name.ljust(width - 2)}  {c['precision']:5.1f} / {c['recall']:5.1f} / {c['f1']:5.1f} / {c['support']}")
    if report.get("skipped_unseen_labels"):
        lines.append(f"warning: {report['skipped_unseen_labels']} test rows with labels training never saw were left out "
                     "(eval/rejects.jsonl)")
    for task, part in (report.get("tasks") or {}).items():
        lines += ["", f"task {task}: " + format_table({"test_examples": part["test_examples"], "systems": part["systems"]})]
    if report.get("task") == "domain":
        t = report["texts"]
        lines.append(f"domain: {t['domain']['documents']} held-out documents, {t['domain']['tokens']} tokens; "
                     f"general: {t['general']['tokens']} tokens of {t['general']['source']}; chunks of {t['chunk_length']} tokens")
    if report.get("forgetting"):
        f = report["forgetting"]
        lines.append(f"forgetting probe: {f['base_accuracy']:.1f}% -> {f['tuned_accuracy']:.1f}% ({f['questions']} questions)" + (" FLAGGED" if f["flagged"] else ""))
    return "\n".join(lines)
