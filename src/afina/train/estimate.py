"""`afina estimate`: parameters, memory and time of a training run, before running it.

Memory comes from a model of what training holds (weights, gradients, AdamW state,
activations, the loss chunk); time from a few real optimizer steps on real batches, scaled to
the run's step count. A run that will not fit in the memory available is flagged.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from afina.config import Recipe
from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
from afina.rundir import RunDir, read_jsonl
from afina.train.batches import collate, epoch_batches
from afina.train.loss import LOSS_CHUNK_TOKENS, accumulate_gradients

GIB = 2**30


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def activation_bytes(config, tokens: int, label_tokens: int, checkpointing: bool) -> int:
    """A coarse model of what the backward pass keeps per micro-batch (bf16 autocast keeps
    fp32 and bf16 copies of most inputs): per token and layer ~ hidden*24 + intermediate*10 bytes."""
    hidden, inter, layers = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size), config.num_hidden_layers
    per_layer = tokens * (hidden * 24 + inter * 10)
    body = tokens * hidden * 4 * layers + per_layer if checkpointing else per_layer * layers
    logits = min(label_tokens, LOSS_CHUNK_TOKENS) * config.vocab_size * 4 * 2
    return int(body + logits)


def estimate(recipe: Recipe, measure_steps: int = 3, available: int | None = None) -> dict[str, Any]:
    from afina.models import load_tokenizer
    from afina.train.loop import encode_split
    from afina.train.methods import apply_method, load_for_method

    run = RunDir(recipe.run_dir)
    cfg = recipe.training
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    tokenizer = load_tokenizer(recipe.model.name)
    train_set = encode_split(tokenizer, read_jsonl(run.require(run.split_path("train"), "prepare")), recipe.data.train_on, recipe)
    pack_length = (cfg.pack_length or recipe.data.max_length) if cfg.packing else None
    batches = epoch_batches(train_set, cfg.batch_size, random.Random(recipe.seed), pack_length)
    steps_per_epoch = max(1, math.ceil(len(batches) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    tokens_per_epoch = sum(len(e["input_ids"]) for e in train_set)

    model = apply_method(load_for_method(recipe.model.name, recipe.method, device), recipe.method)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    largest = max(batches, key=lambda rows: sum(len(train_set[i]["input_ids"]) for row in rows for i in row))
    largest_batch = collate(train_set, largest, tokenizer.pad_token_id, pack_length)
    tokens_mb = largest_batch["input_ids"].numel()
    labels_mb = int((largest_batch["labels"] != -100).sum())
    memory = {
        "weights": weights,
        "gradients": n_trainable * 4,
        "optimizer": n_trainable * 8,  # AdamW: two fp32 moments
        "activations": activation_bytes(model.config, tokens_mb, labels_mb, cfg.gradient_checkpointing),
    }
    memory["total"] = sum(memory.values())
    available = available_memory_bytes(device) if available is None else available
    fits = memory["total"] < 0.9 * available
    result: dict[str, Any] = {
        "total_parameters": sum(p.numel() for p in params),
        "trainable_parameters": n_trainable,
        "train_examples": len(train_set),
        "tokens_per_epoch": tokens_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "memory_bytes": memory,
        "available_bytes": available,
        "fits": fits,
        "precision": precision,
        "device": str(device),
    }
    if not fits:
        result["warning"] = (
            f"the run needs about {memory['total'] / GIB:.1f} GiB but {available / GIB:.1f} GiB is available: "
            "lower training.batch_size or data.max_length, set training.gradient_checkpointing=true, or use method.type=qlora"
        )
        return result

    # Time a few real steps (after one warm-up step) on the first batches of an epoch.
    autocast = autocast_factory(precision, device)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    model.train()
    durations, tokens = [], 0
    for index in range(measure_steps + 1):
        rows_group = batches[(index * cfg.grad_accum) % len(batches) :][: cfg.grad_accum] or batches[: cfg.grad_accum]
        group = [collate(train_set, rows, tokenizer.pad_token_id, pack_length) for rows in rows_group]
        start = time.perf_counter()
        accumulate_gradients(model, group, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:
            durations.append(time.perf_counter() - start)
            tokens += sum(len(train_set[i]["input_ids"]) for rows in rows_group for row in rows for i in row)
    step_time = sum(durations) / len(durations)
    result.update(
        seconds_per_step=round(step_time, 3),
        tokens_per_s=round(tokens / sum(durations), 1),
        expected_seconds=round(step_time * total_steps, 1),
        measured_peak_memory_mb=round(peak_memory_mb(device), 1),
    )
    return result


def format_estimate(result: dict[str, Any]) -> str:
    mem = result["memory_bytes"]
    lines = [
        f"parameters: {result['total_parameters']:,} total, {result['trainable_parameters']:,} trainable "
        f"({100 * result['trainable_parameters'] / result['total_parameters']:.2f}%)",
        f"data: {result['train_examples']} examples, {result['tokens_per_epoch']:,} tokens per epoch, "
        f"{result['steps_per_epoch']} steps per epoch, {result['total_steps']} steps in the run",
        "memory (estimate): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem.items() if k != "total")
        + f"; total {mem['total'] / GIB:.2f} GiB of {result['available_bytes'] / GIB:.1f} GiB available",
    ]
    if "warning" in result:
        lines.append(f"WARNING: {result['warning']}")
    else:
        minutes = result["expected_seconds"] / 60
        lines.append(
            f"time (from {result['precision']} steps measured on {result['device']}): {result['seconds_per_step']} s/step, "
            f"{result['tokens_per_s']} tokens/s, about {minutes:.1f} min for the run; "
            f"peak memory while measuring {result['measured_peak_memory_mb']:.0f} MiB"
        )
    return "\n".join(lines)
