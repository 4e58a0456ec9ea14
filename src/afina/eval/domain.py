"""`afina eval` for `task: domain`: what continued pre-training gained on the domain, and what it cost.

Perplexity (exp of the mean next-token loss, every token labelled once) of the base and the tuned
model on two texts, chunked exactly as in training:

    domain   the held-out test documents of the run (never trained on)
    general  general English text (afina's own sample, or domain.general_text)

Lower domain perplexity is the gain; higher general perplexity is the cost. The forgetting probe
(multiple-choice general knowledge) runs too where enabled.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path
from typing import Any

from afina.config import Recipe
from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
from afina.eval.metrics import perplexity
from afina.eval.sample import eval_rows
from afina.rundir import RunDir, write_json_atomic, write_jsonl
from afina.train.loop import encode_split
from afina.train.loss import mean_label_loss

TEXTS = ("domain", "general")


def default_general_text_path() -> Path:
    return Path(str(resources.files("afina") / "eval" / "data" / "general_text.jsonl"))


def load_general_text(path: Path) -> list[dict[str, str]]:
    """General text as {"text"} rows: a JSONL file with a `text` field per line, or plain text (one row per paragraph)."""
    from afina.data.load import DataError, iter_source, Reject

    if not path.is_file():
        raise FileNotFoundError(f"{path}: general text file not found (domain.general_text)")
    fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    rows = []
    for item in iter_source(path, fmt, "paragraph", None):
        if isinstance(item, Reject):
            raise DataError(item.message())
        text = item.row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{item.file}:{item.line}: a general-text row needs a non-empty string field `text`")
        rows.append({"text": text})
    if not rows:
        raise DataError(f"{path}: no general text in it")
    return rows


def evaluate_domain(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Domain and general perplexity of base and tuned; writes eval/metrics.json and eval/report.html."""
    from afina.eval.evaluate import forgetting_probe, load_tuned, training_cost
    from afina.models import load_model, load_tokenizer

    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name)
    test_rows = eval_rows(recipe)
    if not test_rows:
        raise ValueError(f"{run.split_path('test')} has no rows: set data.split.test above 0 to hold out domain text")
    general_path = recipe.resolve_path(recipe.domain.general_text) if recipe.domain.general_text else default_general_text_path()
    chunks = {"domain": encode_split(tokenizer, test_rows, "all", recipe),
              "general": encode_split(tokenizer, load_general_text(general_path), "all", recipe)}
    if recipe.domain.max_eval_chunks:
        chunks = {name: c[: recipe.domain.max_eval_chunks] for name, c in chunks.items()}

    tuned = load_tuned(recipe, run, device)
    base_model = None

    def model_for(system: str):
        """LoRA's base is the tuned model with the adapter switched off; a full fine-tune needs the base loaded."""
        nonlocal base_model
        if system == "tuned":
            return tuned, contextlib.nullcontext
        if hasattr(tuned, "disable_adapter"):
            return tuned, tuned.disable_adapter
        if base_model is None:
            base_model = load_model(recipe.model.name, "float32").to(device)
        return base_model, contextlib.nullcontext

    systems: dict[str, dict[str, float]] = {}
    for system in ("base", "tuned"):
        model, context = model_for(system)
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
            "domain": {"source": str(run.split_path("test")), "documents": len(test_rows), "chunks": len(chunks["domain"]),
                       "tokens": count_labels(chunks["domain"])},
            "general": {"source": str(general_path), "chunks": len(chunks["general"]), "tokens": count_labels(chunks["general"])},
            "chunk_length": recipe.chunk_length(),
            "overlap": recipe.domain.overlap,
        },
        "systems": systems,
        "change": {name: {"perplexity_ratio": round(systems["tuned"][f"{name}_perplexity"] / systems["base"][f"{name}_perplexity"], 4),
                          "loss_delta": round(systems["tuned"][f"{name}_loss"] - systems["base"][f"{name}_loss"], 4)}
                   for name in TEXTS},
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    report["forgetting"] = forgetting_probe(recipe, tuned, model_for, tokenizer, autocast) if cfg.forgetting.enabled else None
    report["training"] = training_cost(run, cfg.price_per_hour)
    report["recommendation"] = domain_verdict(report)
    write_json_atomic(run.eval / "metrics.json", report)
    write_jsonl(run.eval / "predictions.jsonl", [])  # no generations: domain adaptation is scored by perplexity
    if cfg.report:
        from afina.eval.report import write_report

        write_report(run, report, [], recipe)
    run.update_manifest(eval=report)
    return report


def count_labels(chunks: list[dict[str, list[int]]]) -> int:
    """Tokens that are scored: labelled positions after the first of each chunk (as the loss counts them)."""
    return sum(sum(1 for label in c["labels"][1:] if label != -100) for c in chunks)


def domain_verdict(report: dict[str, Any]) -> list[str]:
    """Plain sentences: the gain on the domain and the cost on general text."""
    base, tuned = report["systems"]["base"], report["systems"]["tuned"]
    change = report["change"]
    gain = 100 * (1 - change["domain"]["perplexity_ratio"])
    cost = 100 * (change["general"]["perplexity_ratio"] - 1)
    lines = [
        f"Domain perplexity {base['domain_perplexity']:.2f} -> {tuned['domain_perplexity']:.2f} "
        f"({'-' if gain >= 0 else '+'}{abs(gain):.1f}%) on {report['texts']['domain']['tokens']} held-out tokens.",
        f"General perplexity {base['general_perplexity']:.2f} -> {tuned['general_perplexity']:.2f} "
        f"({'+' if cost >= 0 else '-'}{abs(cost):.1f}%) on {report['texts']['general']['tokens']} tokens of general text.",
    ]
    if gain <= 0:
        lines.append("Training did not lower the domain perplexity: train longer, raise the learning rate, or give more domain text.")
    elif cost > gain:
        lines.append("General text lost more than the domain gained: lower the learning rate or rank, train fewer steps, "
                     "or mix general text into the training data.")
    return lines
