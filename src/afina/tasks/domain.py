"""`task: domain`: continued pre-training on raw domain text.

`afina prepare` keeps documents whole across splits and reports how they fall into chunks of
`domain.chunk_length` tokens; training cuts each into those chunks (overlap tokens as context),
packs them and puts loss on every token; `afina eval` compares base and tuned perplexity on the
held-out documents and on general text (afina.eval.domain), plus the forgetting probe.
"""

from __future__ import annotations

from typing import Any

from afina.config import Recipe
from afina.data.format import Chunking, encode_split
from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
from afina.eval.domain import TEXTS, count_labels, default_general_text_path, domain_verdict, load_general_text
from afina.eval.forgetting import forgetting_probe
from afina.eval.metrics import perplexity
from afina.eval.outputs import write_eval
from afina.eval.sample import eval_rows
from afina.eval.summary import training_cost
from afina.eval.systems import SystemModels
from afina.models import load_tokenizer
from afina.rundir import RunDir
from afina.tasks import chat
from afina.tasks.base import TaskType
from afina.train.loss import mean_label_loss
from afina.train.task import TrainingTask


def chunking(recipe: Recipe) -> Chunking:
    return Chunking(recipe.chunk_length(), recipe.domain.overlap, recipe.domain.add_eos)


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    return chat.chat_task(recipe, run, chunking=chunking(recipe))


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Domain and general perplexity of base and tuned; writes eval/metrics.json and eval/report.html."""
    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    test_rows = eval_rows(recipe)
    if not test_rows:
        raise ValueError(f"{run.split_path('test')} has no rows: set data.split.test above 0 to hold out domain text")
    general_path = (
        recipe.resolve_path(recipe.domain.general_text) if recipe.domain.general_text else default_general_text_path()
    )
    chunks = {
        "domain": encode_split(tokenizer, test_rows, "all", chunking(recipe)),
        "general": encode_split(tokenizer, load_general_text(general_path), "all", chunking(recipe)),
    }
    if recipe.domain.max_eval_chunks:
        chunks = {name: c[: recipe.domain.max_eval_chunks] for name, c in chunks.items()}

    models = SystemModels.load(recipe, device)
    systems: dict[str, dict[str, float]] = {}
    for system in ("base", "tuned"):
        model, context = models.get(system)
        scores: dict[str, float] = {}
        with context():
            for name in TEXTS:
                loss = mean_label_loss(model, chunks[name], tokenizer.pad_token_id, cfg.batch_size, autocast)
                scores[f"{name}_loss"] = round(loss, 4)
                scores[f"{name}_perplexity"] = round(perplexity(loss), 4)
        systems[system] = scores

    report: dict[str, Any] = {
        "task": "domain",
        "test_examples": len(test_rows),
        "metrics": ["perplexity"],
        "texts": {
            "domain": {
                "source": str(run.split_path("test")),
                "documents": len(test_rows),
                "chunks": len(chunks["domain"]),
                "tokens": count_labels(chunks["domain"]),
            },
            "general": {
                "source": str(general_path),
                "chunks": len(chunks["general"]),
                "tokens": count_labels(chunks["general"]),
            },
            "chunk_length": recipe.chunk_length(),
            "overlap": recipe.domain.overlap,
        },
        "systems": systems,
        "change": {
            name: {
                "perplexity_ratio": round(
                    systems["tuned"][f"{name}_perplexity"] / systems["base"][f"{name}_perplexity"], 4
                ),
                "loss_delta": round(systems["tuned"][f"{name}_loss"] - systems["base"][f"{name}_loss"], 4),
            }
            for name in TEXTS
        },
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    report["forgetting"] = (
        forgetting_probe(recipe, models, tokenizer, autocast, progress) if cfg.forgetting.enabled else None
    )
    report["training"] = training_cost(run, cfg.price_per_hour)
    report["recommendation"] = domain_verdict(report)
    write_eval(recipe, run, report, [])  # no generations: domain adaptation is scored by perplexity
    return report


def score_model(recipe: Recipe, model_spec: str) -> dict[str, Any]:
    """A stage's score: loss per token on its held-out documents, chunked as in training."""
    return chat.score_model(recipe, model_spec, chunking(recipe))


TASK = TaskType(
    name="domain",
    training_task=training_task,
    evaluate=evaluate,
    score_model=score_model,
    as_chat_rows=chat.as_chat_rows,
    chunking=chunking,
)
