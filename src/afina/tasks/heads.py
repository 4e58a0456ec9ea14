"""Models with a new classification head, shared by classification (one label per text) and
tagging (one label per word): the backbone, how it trains, where it is saved, how it is loaded back.

Backbones:
    llm      model.name (the default SmolLM2-135M): the recipe's method (LoRA by default) trains
             an adapter, and the new head trains in full beside it (peft's modules_to_save)
    encoder  a bidirectional encoder (the packaged all-MiniLM-L6-v2 by default), fully fine-tuned
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.config import Recipe, RecipeError
from afina.rundir import RunDir, write_json_atomic
from afina.train.task import TrainingTask

HEAD_FILE = "head.json"  # beside the weights: task, backbone, source, labels
PEFT_TASK_TYPES = {"sequence": "SEQ_CLS", "token": "TOKEN_CLS"}
HEAD_MODULES = ("score", "classifier")  # the head's module name in transformers' *ForSequence/TokenClassification


def backbone_source(recipe: Recipe, backbone: str, encoder: str) -> str:
    from afina.models import resolve_encoder, resolve_model

    return resolve_encoder(encoder) if backbone == "encoder" else resolve_model(recipe.model.name)


def backbone_tokenizer(source: str):
    from afina.models.loader import tokenizer_from

    return tokenizer_from(source)


def output_dir(recipe: Recipe, run: RunDir, backbone: str) -> Path:
    return run.model if backbone == "encoder" or recipe.method.type == "full" else run.adapter


def build_head_model(recipe: Recipe, source: str, head: str, labels: list[str], backbone: str, pad_token_id, device):
    from afina.models import load_head_model
    from afina.train.methods import apply_method

    model = load_head_model(source, head, labels, pad_token_id)
    if backbone == "encoder":
        model.requires_grad_(True)  # 22M parameters: full fine-tuning is cheap and works best
        return model.to(device)
    return apply_method(model, recipe.method, PEFT_TASK_TYPES[head]).to(device)


def is_head_parameter(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def head_param_groups(model, learning_rate: float, head_learning_rate: float | None) -> list[dict[str, Any]]:
    """The new head may learn faster than the adapter/backbone (it starts from random weights)."""
    head: list[Any] = []
    body: list[Any] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if is_head_parameter(name) else body).append(param)
    groups: list[dict[str, Any]] = [{"params": body}] if body else []
    return groups + [{"params": head, "lr": head_learning_rate or learning_rate}]


def head_training_task(
    recipe: Recipe,
    run: RunDir,
    head: str,
    labels: list[str],
    backbone: str,
    encoder: str,
    head_learning_rate: float | None,
    encode,
    loss_fn,
    count_fn,
) -> TrainingTask:
    """A TrainingTask for a head model; `encode(tokenizer, rows)` gives examples with `labels` lists."""
    from afina.train.batches import pad_batch

    if backbone == "llm" and recipe.method.type == "qlora":
        raise RecipeError(f"method.type=qlora is not supported with a {recipe.task} head; use method.type=lora")
    source = backbone_source(recipe, backbone, encoder)
    tokenizer = backbone_tokenizer(source)
    out = output_dir(recipe, run, backbone)
    info = {"task": recipe.task, "head": head, "backbone": backbone, "source": source, "labels": labels}

    def collate(examples, rows, pad_id, _pack_length):
        return pad_batch([examples[row[0]] for row in rows], pad_id)

    return TrainingTask(
        tokenizer=tokenizer,
        encode=lambda rows: encode(tokenizer, rows),
        build_model=lambda device: build_head_model(
            recipe, source, head, labels, backbone, tokenizer.pad_token_id, device
        ),
        output_dir=out,
        method="full (encoder)" if backbone == "encoder" else recipe.method.type,
        collate=collate,
        loss_fn=loss_fn,
        count_fn=count_fn,
        supports_packing=False,
        param_groups=lambda model: head_param_groups(model, recipe.training.learning_rate, head_learning_rate),
        on_save=lambda folder: write_json_atomic(folder / HEAD_FILE, info),
        extra_summary={"backbone": backbone, "head": head, "labels": len(labels)},
    )


def read_head_info(run: RunDir) -> tuple[dict[str, Any], Path]:
    """head.json of a trained head run, and the folder holding the weights."""
    for folder in (run.adapter, run.model):
        if (folder / HEAD_FILE).is_file():
            return json.loads((folder / HEAD_FILE).read_text(encoding="utf-8")), folder
    raise FileNotFoundError(f"{run.root}: no trained head ({HEAD_FILE} in adapter/ or model/); run `afina train` first")


def load_trained_head(recipe: Recipe, run: RunDir, device):
    """(model, tokenizer, labels) of a trained head run, ready for inference."""
    info, folder = read_head_info(run)
    from afina.models import load_head_model

    tokenizer = backbone_tokenizer(str(folder))
    if folder == run.model:
        model = load_head_model(str(folder), info["head"], info["labels"], tokenizer.pad_token_id)
    else:
        from peft import PeftModel

        base = load_head_model(info["source"], info["head"], info["labels"], tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(base, str(folder))
    return model.to(device).eval(), tokenizer, info["labels"]
