"""`task: chat` (the default): next-token loss on the assistant turns of chat rows, evaluated by
generating answers to the test split with every system of `eval.systems`:

    base          the base model, zero-shot
    base_fewshot  the base model with k train examples in the prompt (random or most similar)
    base_rag      the base model with the top-k retrieved passages in the prompt
    tuned         the fine-tuned model
    tuned_rag     the fine-tuned model with the same retrieved passages

then the forgetting probe for base and tuned, the cost of each system (latency, tokens/s, memory,
cost per 1,000 requests) and eval/report.html. The metrics and prompts are in afina.eval.generative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from afina.config import Recipe, RecipeError
from afina.data.format import Chunking, encode_split
from afina.device import (
    autocast_factory,
    peak_memory_mb,
    pick_device,
    progress_line,
    recipe_weight_dtype,
    resolve_precision,
)
from afina.eval.forgetting import forgetting_probe
from afina.eval.generate import AnswerBudget, answer_budget, cut_answers, generate_timed
from afina.eval.generative import (
    few_shot_prompts,
    last_user_text,
    per_task,
    rag_prompts,
    resolve_metrics,
    score_system,
    tasks_of,
)
from afina.eval.outputs import write_eval
from afina.eval.risks import (
    add_intervals,
    add_overfitting,
    chat_bias_probe,
    chat_hallucination,
    chat_memorisation,
    risk_sentences,
)
from afina.eval.sample import eval_rows
from afina.eval.summary import efficiency_of, recommend, training_cost
from afina.eval.systems import TUNED_SYSTEMS, SystemModels
from afina.models import load_tokenizer, recipe_rope_settings
from afina.rundir import RunDir, read_jsonl
from afina.tasks.base import TaskType
from afina.train.loss import label_loss_sum, mean_label_loss
from afina.train.methods import apply_method, load_for_method
from afina.train.task import TrainingTask

Prompts = list[list[dict[str, str]]]


# ---- training -----------------------------------------------------------------------------------


def chat_task(recipe: Recipe, run: RunDir, messages_of=None, chunking: Chunking | None = None) -> TrainingTask:
    """Chat rows, or any rows that `messages_of(row)` turns into a chat (generative classification);
    `chunking` (domain adaptation): text rows cut into chunks of tokens."""
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)

    def encode(rows):
        if messages_of is not None:
            rows = [{"messages": messages_of(row)} for row in rows]
        return encode_split(tokenizer, rows, recipe.data.train_on, chunking)

    return TrainingTask(
        tokenizer=tokenizer,
        encode=encode,
        build_model=lambda device: apply_method(
            load_for_method(
                recipe.model.name,
                recipe.method,
                device,
                recipe_rope_settings(recipe),
                recipe_weight_dtype(recipe, device),
            ),
            recipe.method,
        ),
        output_dir=run.model if recipe.method.type == "full" else run.adapter,
        method=recipe.method.type,
        builds_on_meta=True,
    )


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    labelled = next((row for row in train_rows if "label" in row or "tags" in row), None)
    if labelled is not None:  # a chat model would learn the text alone and never see the labels
        raise RecipeError(
            f"{run.split_path('train')}: task: chat cannot learn labelled rows "
            f"(first: {labelled.get('source', labelled.get('id'))} has {sorted(labelled)}); set task: "
            f"{'classification' if 'label' in labelled else 'tagging'} or leave task out to have it inferred"
        )
    return chat_task(recipe, run)


# ---- evaluation ---------------------------------------------------------------------------------


@dataclass
class ChatEval:
    """The test rows and what every system is scored with."""

    recipe: Recipe
    run: RunDir
    rows: list[dict[str, Any]]
    train_rows: list[dict[str, Any]]
    tokenizer: Any
    device: Any
    autocast: Any
    metrics: list[str]
    tasks: dict[str, list[int]]  # multi-task: the row indices of each task ({} for one task)
    task_metrics: dict[str, list[str]] = field(default_factory=dict)
    budget: AnswerBudget = field(default_factory=lambda: AnswerBudget(64, "recipe"))  # new tokens per answer


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Every system of eval.systems answers the test split; metrics, cost, forgetting; eval/ written."""
    ev = chat_eval(recipe)
    cfg = recipe.eval
    prompts, retrieved = system_prompts(ev)
    needs_tuned = any(s in TUNED_SYSTEMS for s in cfg.systems) or cfg.forgetting.enabled
    models = SystemModels.load(recipe, ev.device, with_tuned=needs_tuned)
    results: dict[str, dict[str, Any]] = {}
    efficiency: dict[str, dict[str, float]] = {}
    by_task: dict[str, dict[str, Any]] = {task: {} for task in ev.tasks}
    predictions: list[dict[str, Any]] = []
    answers: dict[str, list[str]] = {}
    cut: dict[str, dict[str, float]] = {}
    for system in cfg.systems:
        generation, loss, task_loss = answer_with(ev, models, system, prompts[system], progress)
        answers[system] = generation.answers
        cut[system] = cut_answers(generation.new_tokens, ev.budget.tokens)
        results[system], per_example = score_system(ev.rows, generation.answers, loss, ev.metrics, cfg.sandbox)
        for task, idx in ev.tasks.items():  # the same answers, scored per task
            by_task[task][system] = score_system(
                [ev.rows[i] for i in idx],
                [generation.answers[i] for i in idx],
                task_loss.get(task),
                ev.task_metrics[task],
                cfg.sandbox,
            )[0]
        efficiency[system] = efficiency_of(generation, len(ev.rows), peak_memory_mb(ev.device), cfg.price_per_hour)
        predictions += prediction_rows(
            ev.rows, system, generation, per_example, retrieved if system.endswith("_rag") else None
        )
    report: dict[str, Any] = {
        "test_examples": len(ev.rows),
        "metrics": ev.metrics,
        "systems": results,
        "efficiency": efficiency,
        "answer_length": {"max_new_tokens": ev.budget.tokens, "how": ev.budget.describe(), "cut": cut},
    }
    if ev.tasks:
        report["tasks"] = {
            task: {"test_examples": len(idx), "metrics": ev.task_metrics[task], "systems": by_task[task]}
            for task, idx in ev.tasks.items()
        }
    forgetting = cfg.forgetting.enabled and models.tuned is not None
    report["forgetting"] = forgetting_probe(recipe, models, ev.tokenizer, ev.autocast, progress) if forgetting else None
    report["training"] = training_cost(ev.run, cfg.price_per_hour)
    chat_risks(ev, models, report, predictions, answers, prompts, progress)
    report["recommendation"] = recommend(report) + risk_sentences(report)
    progress_line("eval: writing eval/metrics.json, predictions.jsonl and report.html", progress)
    write_eval(recipe, ev.run, report, predictions)
    return report


def chat_risks(
    ev: ChatEval,
    models: SystemModels,
    report: dict[str, Any],
    predictions: list[dict[str, Any]],
    answers: dict[str, list[str]],
    prompts: dict[str, Prompts],
    progress: bool,
) -> None:
    """Error bars, overfitting (with the tuned model's answers to a sample of train rows), invented facts and
    (eval.risks.bias=true) the bias probe: afina.eval.risks."""
    progress_line(
        f"eval: bootstrap intervals ({ev.recipe.eval.risks.resamples} resamples over {len(ev.rows)} rows)", progress
    )
    add_intervals(ev.recipe, report, predictions)

    def answer_as(system: str, conversations: Prompts) -> list[str]:
        model, context = models.get(system)
        with context():
            return generate_timed(
                model,
                ev.tokenizer,
                conversations,
                ev.budget.tokens,
                ev.recipe.eval.batch_size,
                ev.autocast,
                desc=f"eval {system} (risks)",
                progress=progress,
            ).answers

    def answer(conversations: Prompts) -> list[str]:
        return answer_as("tuned", conversations)

    def score(rows, tuned_answers):
        return score_system(
            rows, tuned_answers, None, [m for m in ev.metrics if m != "perplexity"], ev.recipe.eval.sandbox
        )[1]

    tuned = models.tuned is not None
    progress_line("eval: memorisation check (the tuned model on a sample of train rows)", progress and tuned)
    memorisation = (
        chat_memorisation(ev.recipe, report, predictions, ev.train_rows, answer, score) if models.tuned else None
    )
    add_overfitting(ev.recipe, ev.run, report, memorisation)
    progress_line("eval: hallucination check (facts in answers that no reference or passage holds)", progress)
    chat_hallucination(ev.recipe, report, ev.rows, ev.train_rows, answers, prompts, answer_as)
    bias = ev.recipe.eval.risks.bias is True  # chat runs the probe only when asked
    progress_line("eval: bias probe (questions with names, genders and nationalities swapped)", progress and bias)
    chat_bias_probe(ev.recipe, report, ev.rows, ev.tokenizer, models, ev.autocast)


def chat_eval(recipe: Recipe) -> ChatEval:
    run = RunDir(recipe.run_dir)
    device = pick_device()
    rows = eval_rows(recipe)
    if not rows:
        raise ValueError(f"{run.split_path('test')} has no rows: set data.split.test above 0")
    unreadable = next((row for row in rows if "messages" not in row), None)
    if unreadable is not None:
        raise RecipeError(
            f"{run.split_path('test')}: task: chat answers chat turns (messages), but the test rows are "
            f"{sorted(k for k in unreadable if k not in ('id', 'source'))} "
            f"(first: {unreadable.get('source', unreadable.get('id'))}); "
            "set the task that reads them (task: classification for text + label, task: domain for plain text) "
            "or map the data to chat turns with data.schema and data.fields, then prepare and train again"
        )
    train_path = run.split_path("train")
    tasks = tasks_of(rows)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    window = getattr(tokenizer, "model_max_length", None)
    references = [str(row["messages"][-1].get("content") or "") for row in rows]
    return ChatEval(
        recipe=recipe,
        run=run,
        rows=rows,
        train_rows=read_jsonl(train_path) if train_path.is_file() else [],
        tokenizer=tokenizer,
        device=device,
        autocast=autocast_factory(resolve_precision(recipe.training.precision, device), device),
        metrics=resolve_metrics(recipe.eval.metrics, rows),
        tasks=tasks,
        task_metrics={
            task: resolve_metrics(recipe.eval.metrics, [rows[i] for i in idx]) for task, idx in tasks.items()
        },
        budget=answer_budget(
            recipe.eval.max_new_tokens, tokenizer, references, window if window and window < 10**6 else None
        ),
    )


def system_prompts(ev: ChatEval) -> tuple[dict[str, Prompts], list[list[str]] | None]:
    """The prompts each system sees; base_rag and tuned_rag share their retrieved passages (their ids too)."""
    cfg, rows = ev.recipe.eval, ev.rows
    zero_shot = [row["messages"][:-1] for row in rows]
    prompts: dict[str, Prompts] = {"base": zero_shot, "tuned": zero_shot}
    retrieved = None
    if "base_fewshot" in cfg.systems:
        prompts["base_fewshot"] = per_task(
            rows,
            ev.train_rows,
            lambda test, train: few_shot_prompts(
                test, train, cfg.few_shot.k, cfg.few_shot.selection, ev.recipe.seed, cfg.few_shot.ids
            ),
        )
    if {"base_rag", "tuned_rag"} & set(cfg.systems):
        prompts["base_rag"], retrieved = rag_prompts(ev.recipe, rows, ev.train_rows)
        prompts["tuned_rag"] = prompts["base_rag"]
    return prompts, retrieved


def answer_with(ev: ChatEval, models: SystemModels, system: str, conversations: Prompts, progress: bool):
    """The system's greedy answers, and (metric perplexity) the reference answers' loss under its own prompts,
    overall and per task."""
    cfg = ev.recipe.eval
    model, context = models.get(system)
    if ev.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    loss, task_loss = None, {}
    with context():
        generation = generate_timed(
            model,
            ev.tokenizer,
            conversations,
            ev.budget.tokens,
            cfg.batch_size,
            ev.autocast,
            desc=f"eval {system}",
            progress=progress,
        )
        if "perplexity" in ev.metrics:
            full = [{"messages": conv + [row["messages"][-1]]} for conv, row in zip(conversations, ev.rows)]
            sums = {
                task: label_loss_sum(
                    model,
                    encode_split(ev.tokenizer, [full[i] for i in idx], "assistant"),
                    ev.tokenizer.pad_token_id,
                    cfg.batch_size,
                    ev.autocast,
                )
                for task, idx in (ev.tasks or {"": list(range(len(ev.rows)))}).items()
            }
            loss = sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)
            task_loss = {task: t / max(n, 1) for task, (t, n) in sums.items()}
    return generation, loss, task_loss


def prediction_rows(rows, system: str, generation, per_example, retrieved) -> list[dict[str, Any]]:
    """eval/predictions.jsonl lines of one system: question, reference, answer, its scores and cost."""
    return [
        {
            "id": row["id"],
            **({"task": row["task"]} if "task" in row else {}),
            "system": system,
            "question": last_user_text(row["messages"][:-1]),
            "reference": row["messages"][-1]["content"],
            "prediction": answer,
            **per_example[i],
            **({"retrieved": retrieved[i]} if retrieved is not None else {}),
            "latency_s": round(generation.latency_s[i], 4),
            "new_tokens": generation.new_tokens[i],
        }
        for i, (row, answer) in enumerate(zip(rows, generation.answers))
    ]


# ---- sequential stages --------------------------------------------------------------------------


def score_model(recipe: Recipe, model_spec: str, chunking: Chunking | None = None) -> dict[str, Any]:
    """A plain causal LM's loss per label token on this stage's test split (lower is better)."""
    import torch

    from afina.models import load_model

    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(model_spec)
    rows = eval_rows(recipe)
    model = load_model(model_spec, recipe_weight_dtype(recipe, device)).to(device).eval()
    encoded = encode_split(tokenizer, rows, recipe.data.train_on, chunking)
    with torch.no_grad():
        loss = mean_label_loss(model, encoded, tokenizer.pad_token_id, recipe.eval.batch_size, autocast)
    return {"metric": "test_loss", "value": round(loss, 4), "lower_is_better": True, "examples": len(rows)}


def as_chat_rows(recipe: Recipe, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat rows replay as they are."""
    return rows


TASK = TaskType(
    name="chat",
    training_task=training_task,
    evaluate=evaluate,
    score_model=score_model,
    as_chat_rows=as_chat_rows,
)
