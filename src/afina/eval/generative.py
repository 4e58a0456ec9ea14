"""Generated answers scored against references: the metrics the rows call for, and the prompts of the systems
that `afina eval` compares (task: chat, in afina/tasks/chat.py):

    base          the base model, zero-shot
    base_fewshot  the base model with k train examples in the prompt (random or most similar)
    base_rag      the base model with the top-k retrieved passages in the prompt
    tuned         the fine-tuned model
    tuned_rag     the fine-tuned model with the same retrieved passages

"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from afina.config import Recipe
from afina.eval.metrics import (
    bleu,
    chrf,
    classification_scores,
    contains_all,
    exact_match,
    key_recall,
    length_stats,
    perplexity,
    rouge_scores,
    sentence_chrf,
    token_f1,
    token_f1_one,
)


def resolve_metrics(requested: Sequence[str] | str, rows: list[dict[str, Any]]) -> list[str]:
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
    return [
        row["messages"][-1]["content"],
        *[r for r in row.get("references", []) if r != row["messages"][-1]["content"]],
    ]


def last_user_text(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


# ---- prompts of each system -------------------------------------------------------------------


def few_shot_prompts(
    rows, train_rows, k: int, selection: str, seed: int, ids: list[str] | None = None
) -> list[list[dict[str, str]]]:
    """Each test prompt preceded by k solved train examples as earlier turns of the chat (or the train rows
    named by `ids`, the same for every prompt)."""
    if not train_rows:
        raise ValueError("base_fewshot needs train examples, but the train split is empty")
    k = min(k, len(train_rows))
    if ids:
        where = {str(r.get("id")): i for i, r in enumerate(train_rows)}
        missing = [i for i in ids if str(i) not in where]
        if missing:
            raise ValueError(
                f"eval.few_shot.ids: no train row has id {', '.join(map(str, missing))} (map an id field with "
                "data.fields.id, and keep those rows in train, e.g. with data.split_values)"
            )
        picks = [[where[str(i)] for i in ids] for _ in rows]
    elif selection == "similar":
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
            f"[{n}] {(p.title + ': ') if p.title else ''}{p.text[: cfg.max_passage_chars]}"
            for n, p in enumerate(found, 1)
        )
        content = f"Context:\n{context}\n\nUse the context above if it helps.\n\n{question}"
        messages = [dict(m) for m in row["messages"][:-1]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last] = {"role": "user", "content": content}
        prompts.append(messages)
    return prompts, [[p.id for p in found] for found in hits]


# ---- scoring ------------------------------------------------------------------------------------


def score_system(
    rows, answers: list[str], loss: float | None, metrics: list[str], sandbox_cfg=None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus scores of one system, and per-example scores (for the worst-examples list)."""
    references = [references_of(row) for row in rows]
    scores: dict[str, Any] = {}
    per_example: list[dict[str, Any]] = [{} for _ in rows]
    if "facts" in metrics:
        keyed = [(i, row["must_include"]) for i, row in enumerate(rows) if row.get("must_include")]
        if keyed:
            for i, keys in keyed:
                per_example[i]["correct"] = contains_all(answers[i], keys)
                per_example[i]["fact_recall"] = round(key_recall(answers[i], keys), 4)
            scores["fact_accuracy"] = 100.0 * sum(per_example[i]["correct"] for i, _ in keyed) / len(keyed)
            scores["fact_recall"] = 100.0 * sum(key_recall(answers[i], k) for i, k in keyed) / len(keyed)
    if "classification" in metrics:
        labelled = classification_scores(answers, [r[0] for r in references])
        scores["accuracy"], scores["macro_f1"] = labelled["accuracy"], labelled["macro_f1"]
        scores["confusion"] = labelled["confusion"]
        for i, label in enumerate(labelled["predicted"]):
            per_example[i]["predicted_label"], per_example[i]["correct"] = label, label == references[i][0]
    if "pass@1" in metrics:
        from afina.eval.sandbox import extract_code, program_for_task, run_program

        limits = (
            {
                "time_limit_s": sandbox_cfg.time_limit_s,
                "memory_mb": sandbox_cfg.memory_mb,
                "allow_weak": sandbox_cfg.allow_weak,
            }
            if sandbox_cfg
            else {}
        )
        for i, row in enumerate(rows):
            program = program_for_task(extract_code(answers[i]), row["tests"], row.get("test_setup", ""))
            result = run_program(program, **limits)
            per_example[i]["passed"], per_example[i]["sandbox"] = result.passed, result.status
        scores["pass@1"] = 100.0 * sum(e["passed"] for e in per_example) / len(rows)
    if "exact_match" in metrics:
        scores["exact_match"] = exact_match(answers, [r[0] for r in references])
        for i in range(len(rows)):
            per_example[i]["exact_match"] = exact_match([answers[i]], [references[i][0]]) == 100.0
    if "token_f1" in metrics:
        scores["token_f1"] = token_f1(answers, references)
        for i in range(len(rows)):
            per_example[i]["token_f1"] = round(100.0 * max(token_f1_one(answers[i], r) for r in references[i]), 2)
    if "rouge" in metrics:
        scores.update(rouge_scores(answers, references))
        for i in range(len(rows)):  # per example, for the error bars (afina.eval.uncertainty)
            per_example[i].update({k: round(v, 2) for k, v in rouge_scores([answers[i]], [references[i]]).items()})
    if "bleu" in metrics:
        scores["bleu"] = bleu(answers, references)
    if "chrf" in metrics:
        scores["chrf"] = chrf(answers, references)
        for i in range(len(rows)):
            per_example[i]["chrf"] = round(sentence_chrf(answers[i], references[i]), 2)
    if "length" in metrics:
        scores.update(length_stats(answers, references))
        for i in range(len(rows)):
            per_example[i]["words"] = len(answers[i].split())
    if "perplexity" in metrics and loss is not None:
        scores["answer_loss"] = loss
        scores["answer_perplexity"] = perplexity(loss)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}, per_example


# ---- multi-task rows ---------------------------------------------------------------------------


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
