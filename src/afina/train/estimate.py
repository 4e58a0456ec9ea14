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
from afina.models import recipe_rope_settings
from afina.train.task import TrainingTask
from afina.train.batches import collate, epoch_batches, pack_settings
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


def activation_bytes(config, tokens: int, label_tokens: int, checkpointing: bool, rows: int = 1,
                     attention: str = "sdpa") -> int:
    """A coarse model of what the backward pass keeps per micro-batch (bf16 autocast keeps
    fp32 and bf16 copies of most inputs): per token and layer ~ hidden*24 + intermediate*10 bytes.

    Long sequences: with eager attention the score matrices (rows x heads x seq^2, fp32 scores and
    probabilities) are kept per layer and grow with the square of the length; fused (sdpa/flash)
    attention keeps only per-token statistics, so memory stays linear in the length.
    """
    hidden, inter, layers = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size), config.num_hidden_layers
    per_layer = tokens * (hidden * 24 + inter * 10)
    if attention == "eager":
        seq = tokens // max(rows, 1)
        per_layer += rows * config.num_attention_heads * seq * seq * 4 * 2
    body = tokens * hidden * 4 * layers + per_layer if checkpointing else per_layer * layers
    logits = min(label_tokens, LOSS_CHUNK_TOKENS) * config.vocab_size * 4 * 2
    return int(body + logits)


def attention_flops_share(config, seq: int) -> float:
    """The share of a forward pass's matrix FLOPs spent in attention scores (QK^T and AV) at this length:
    per token 4*seq*hidden per layer against ~2*params for the weights; it grows linearly with seq."""
    hidden, inter, layers = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size), config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    weights = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter)
    attention = layers * 4 * seq * hidden / 2  # causal: half the score matrix on average
    return attention / (weights + attention)


def estimate(recipe: Recipe, task: TrainingTask, train_rows: list[dict[str, Any]], measure_steps: int = 3,
             available: int | None = None) -> dict[str, Any]:
    """Parameters, memory and (measured over a few real steps) time of training `task` on the rows: the task
    type's examples, model and loss, as training uses them (`afina.pipeline.estimate` builds the task)."""
    cfg = recipe.training
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    tokenizer = task.tokenizer
    train_set = task.encode(train_rows)
    pack_length, continuous = pack_settings(recipe)
    collate_fn = task.collate or (lambda examples, rows, pad, length: collate(examples, rows, pad, length, continuous))
    batches = epoch_batches(train_set, cfg.batch_size, random.Random(recipe.seed), pack_length)
    steps_per_epoch = max(1, math.ceil(len(batches) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    tokens_per_epoch = sum(len(e["input_ids"]) for e in train_set)

    rope = recipe_rope_settings(recipe)
    model = task.build_model(device)  # the chat task applies the same rope scaling
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    largest = max(batches, key=lambda rows: sum(len(train_set[i]["input_ids"]) for row in rows for i in row))
    largest_batch = collate_fn(train_set, largest, tokenizer.pad_token_id, pack_length)
    tokens_mb = largest_batch["input_ids"].numel()
    labels_mb = int((largest_batch["labels"] != -100).sum())
    memory = {
        "weights": weights,
        "gradients": n_trainable * 4,
        "optimizer": n_trainable * 8,  # AdamW: two fp32 moments
        "activations": activation_bytes(model.config, tokens_mb, labels_mb, cfg.gradient_checkpointing,
                                        rows=largest_batch["input_ids"].shape[0],
                                        attention=getattr(model.config, "_attn_implementation", None) or "sdpa"),
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
        "sequence_length": largest_batch["input_ids"].shape[1],
        "attention_flops_share": round(attention_flops_share(model.config, largest_batch["input_ids"].shape[1]), 3),
        **({"rope_scaling": rope} if rope else {}),
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
        group = [collate_fn(train_set, rows, tokenizer.pad_token_id, pack_length) for rows in rows_group]
        start = time.perf_counter()
        accumulate_gradients(model, group, autocast, loss_fn=task.loss_fn, count_fn=task.count_fn)
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
        f"sequences: up to {result['sequence_length']} tokens per row; attention is "
        f"{100 * result['attention_flops_share']:.0f}% of the forward FLOPs at that length"
        + (f"; rope scaling {result['rope_scaling']['rope_type']} x{result['rope_scaling']['factor']:g} "
           f"({result['rope_scaling']['original_length']} -> {result['rope_scaling']['target_length']} tokens)"
           if result.get("rope_scaling") else ""),
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
