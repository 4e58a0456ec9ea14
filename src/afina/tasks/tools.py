"""`task: tools`: fine-tune a model to call tools (pick one, fill its arguments, or answer without one).

Training is the chat task's: tool rows (afina.data.tools) are rendered with their tools by the chat template
(the model's own, or `model.chat_template: chatml-tools`), loss on the assistant's calls and answers, never on
tool results. Evaluation answers each test row's last assistant turn with every system of eval.systems:

    base          the base model, zero-shot, the row's tools listed in its prompt
    base_fewshot  the base model with k solved train rows (their calls included) before the question, the tools of
                  the examples and the row listed
    tuned         the fine-tuned model, as base

Answers are generated greedily and unconstrained, so JSON validity measures the model itself (afina serve holds
calls to their schemas at run time). Scores: afina.eval.tool_metrics, each with its bootstrap interval and the
paired difference tuned - base / tuned - base_fewshot; then time, memory and cost per system and the advisor's
recommendation.
"""

from __future__ import annotations

import json
from typing import Any

from afina.config import Recipe, RecipeError
from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
from afina.eval.generate import answer_budget, generate_timed
from afina.eval.generative import few_shot_prompts
from afina.eval.outputs import write_eval
from afina.eval.risks import add_intervals, risk_sentences
from afina.eval.sample import eval_rows
from afina.eval.summary import efficiency_of, recommend, training_cost
from afina.eval.systems import SystemModels
from afina.eval.tool_metrics import TOOL_METRICS, score_tool_answer, tool_metric_means
from afina.models import load_tokenizer
from afina.rundir import RunDir, read_jsonl
from afina.tasks import chat
from afina.tasks.base import TaskType
from afina.train.task import TrainingTask

SYSTEMS = ("base", "base_fewshot", "tuned")


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    if not any(row.get("tools") for row in train_rows):
        raise RecipeError(
            f"{run.split_path('train')}: task: tools needs rows that offer tools (a `tools` list beside the messages): "
            "none of the train rows has one. Check the data (afina.data.tools lists the shapes read) or use task: chat"
        )
    return chat.training_task(recipe, run, train_rows)


def _tools_seen(prompt: list[dict[str, Any]], own: list[dict[str, Any]], known: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's own tools, then the tools the prompt's examples call (few-shot), each name once."""
    tools = list(own)
    names = {t["function"]["name"] for t in tools}
    for message in prompt:
        for call in message.get("tool_calls", ()):
            name = call["function"]["name"]
            if name not in names and name in known:
                tools.append(known[name])
                names.add(name)
    return tools


def system_inputs(recipe: Recipe, rows, train_rows) -> dict[str, tuple[list, list]]:
    """(prompts, tools per prompt) of each system."""
    cfg = recipe.eval
    refused = [s for s in cfg.systems if s not in SYSTEMS]
    if refused:
        raise RecipeError(
            f"eval.systems: task: tools evaluates {', '.join(SYSTEMS)}; {', '.join(refused)} is not available for it"
        )
    zero_shot = [row["messages"][:-1] for row in rows]
    inputs = {"base": (zero_shot, [row.get("tools", []) for row in rows])}
    inputs["tuned"] = inputs["base"]
    if "base_fewshot" in cfg.systems:
        known = {t["function"]["name"]: t for row in train_rows for t in row.get("tools", ())}
        prompts = few_shot_prompts(rows, train_rows, cfg.few_shot.k, cfg.few_shot.selection, recipe.seed)
        tools = [_tools_seen(p, row.get("tools", []), known) for p, row in zip(prompts, rows)]
        inputs["base_fewshot"] = (prompts, tools)
    return inputs


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Every system answers the test rows' last assistant turn; tool metrics with intervals, cost; eval/ written."""
    run = RunDir(recipe.run_dir)
    rows = [row for row in eval_rows(recipe) if "messages" in row]
    if not rows:
        raise ValueError(f"{run.split_path('test')} has no chat rows: set data.split.test above 0")
    train_path = run.split_path("train")
    train_rows = read_jsonl(train_path) if train_path.is_file() else []
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    cfg = recipe.eval
    inputs = system_inputs(recipe, rows, train_rows)
    models = SystemModels.load(recipe, device, with_tuned="tuned" in cfg.systems)
    report: dict[str, Any] = {"test_examples": len(rows), "metrics": list(TOOL_METRICS), "systems": {}}
    report["efficiency"], predictions = {}, []
    # Unset eval.max_new_tokens: from the reference turns (their text, or their calls as JSON).
    turns = [row["messages"][-1] for row in rows]
    references = [json.dumps(t["tool_calls"]) if t.get("tool_calls") else str(t.get("content") or "") for t in turns]
    budget = answer_budget(cfg.max_new_tokens, tokenizer, references).tokens
    for system in cfg.systems:
        prompts, tools = inputs[system]
        model, context = models.get(system)
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        with context():
            generation = generate_timed(
                model,
                tokenizer,
                prompts,
                budget,
                cfg.batch_size,
                autocast,
                f"eval {system}",
                progress,
                tools,
            )
        scores = [score_tool_answer(row["messages"][-1], answer) for row, answer in zip(rows, generation.answers)]
        report["systems"][system] = tool_metric_means(scores)
        report["efficiency"][system] = efficiency_of(generation, len(rows), peak_memory_mb(device), cfg.price_per_hour)
        predictions += [
            {
                "id": row["id"],
                "system": system,
                "question": next((m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user"), ""),
                "reference": reference_text(row["messages"][-1]),
                "prediction": answer,
                **score,
                "latency_s": round(generation.latency_s[i], 4),
                "new_tokens": generation.new_tokens[i],
            }
            for i, (row, answer, score) in enumerate(zip(rows, generation.answers, scores))
        ]
    report["training"] = training_cost(run, cfg.price_per_hour)
    report["forgetting"] = None
    add_intervals(recipe, report, predictions)
    report["recommendation"] = recommend(report) + risk_sentences(report)
    write_eval(recipe, run, report, predictions)
    return report


def reference_text(message: dict[str, Any]) -> str:
    """The reference turn as the model should write it: its text, or its calls as <tool_call> blocks."""
    calls = [
        f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}\n</tool_call>'
        for c in message.get("tool_calls", ())
    ]
    return "\n".join([message["content"]] * bool(message["content"]) + calls)


TASK = TaskType(
    name="tools",
    training_task=training_task,
    evaluate=evaluate,
    score_model=chat.score_model,
    as_chat_rows=chat.as_chat_rows,
)
