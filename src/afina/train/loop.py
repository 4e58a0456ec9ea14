"""`afina train`: fine-tune the recipe's model on the prepared train split."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from afina.config import Recipe
from afina.data.format import encode_chat
from afina.device import autocast_factory, peak_memory_mb, pick_device, progress_interval, resolve_precision
from afina.rundir import RunDir, read_jsonl
from afina.train.loss import accumulate_gradients, mean_label_loss, pad_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def encode_split(tokenizer, rows: list[dict[str, Any]], train_on: str) -> list[dict[str, list[int]]]:
    return [encode_chat(tokenizer, row["messages"], train_on) for row in rows]


def apply_method(model, recipe: Recipe):
    """Wrap the model for the recipe's method: LoRA through peft, or all weights trainable."""
    method = recipe.method
    if method.type == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def micro_batches(encoded: list[dict[str, list[int]]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled micro-batches of example indices; examples of similar length share a batch."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    # Sort within windows of 8 batches: little padding, still a random order of batches.
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i]["input_ids"]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def make_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(recipe.training.scheduler, recipe.training.scheduler)
    warmup = int(round(recipe.training.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    from afina.models import load_model, load_tokenizer

    run = RunDir(recipe.run_dir)
    cfg = recipe.training
    seed_everything(recipe.seed)
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    autocast = autocast_factory(precision, device)

    tokenizer = load_tokenizer(recipe.model.name)
    train_rows = read_jsonl(run.require(run.split_path("train"), "prepare"))
    val_rows = read_jsonl(run.require(run.split_path("validation"), "prepare"))
    if not train_rows:
        raise ValueError(f"{run.split_path('train')} has no rows: give more data or a larger data.split.train")
    train_set = encode_split(tokenizer, train_rows, recipe.data.train_on)
    val_set = encode_split(tokenizer, val_rows, recipe.data.train_on)

    # Master weights stay fp32; matmuls run in bf16 under autocast (faster on this CPU than a bf16 copy).
    model = apply_method(load_model(recipe.model.name, "float32"), recipe).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(math.ceil(len(train_set) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    rng = random.Random(recipe.seed)
    pad_id = tokenizer.pad_token_id

    def validation_loss() -> float | None:
        if not val_set:
            return None
        model.eval()
        loss = mean_label_loss(model, val_set, pad_id, cfg.batch_size, autocast)
        model.train()
        return loss

    run.metrics.unlink(missing_ok=True)
    metrics_file = run.metrics.open("a", encoding="utf-8")
    history = {"val_loss_before": validation_loss()}
    model.train()
    step, tokens_seen, start = 0, 0, time.perf_counter()
    queue: list[list[int]] = []
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, mininterval=progress_interval())
    last_loss = float("nan")
    while step < total_steps:
        if len(queue) < cfg.grad_accum:
            queue += micro_batches(train_set, cfg.batch_size, rng)
        group = [pad_batch([train_set[i] for i in idx], pad_id) for idx in queue[: cfg.grad_accum]]
        del queue[: cfg.grad_accum]
        step_loss, _ = accumulate_gradients(model, group, autocast)
        tokens_seen += sum(int(b["attention_mask"].sum()) for b in group)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)) if cfg.max_grad_norm else None
        )
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss became {step_loss} at step {step + 1}, so training stopped before that update; "
                "check the data and the model weights, or lower training.learning_rate"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = step_loss
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}", mem=f"{peak_memory_mb(device):.0f}MB")
        val_loss = None
        if step == total_steps or step % steps_per_epoch == 0:  # validate at each epoch's end
            val_loss = history["val_loss_after"] = validation_loss()
        if step % cfg.log_every == 0 or val_loss is not None:
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 3),
                "loss": round(step_loss, 5),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / elapsed, 1),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                **({"val_loss": val_loss} if val_loss is not None else {}),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
    bar.close()
    metrics_file.close()

    out_dir = run.adapter if recipe.method.type == "lora" else run.model
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "method": recipe.method.type,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 2),
        "train_examples": len(train_set),
        "tokens": tokens_seen,
        "tokens_per_s": round(tokens_seen / (time.perf_counter() - start), 1),
        "final_train_loss": round(last_loss, 5),
        "val_loss_before": history["val_loss_before"],
        "val_loss_after": history["val_loss_after"],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "precision": precision,
        "device": str(device),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "output": str(out_dir),
    }
    run.update_manifest(train=summary)
    return summary
