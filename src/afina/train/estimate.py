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
from afina.device import autocast_factory, peak_memory_mb, pick_device, recipe_weight_dtype, resolve_precision
from afina.models import recipe_rope_settings
from afina.models.rope import apply_rope_settings
from afina.rundir import RunDir
from afina.train.batches import collate, epoch_batches, pack_settings
from afina.train.gpus import CUDA_RUNTIME_BYTES, GpuSpec, format_gpu_time, gpu_time
from afina.train.loss import accumulate_gradients
from afina.train.memory import GIB, MemoryPlan, alternatives, memory_estimate, meta_model, model_config, runtime_bytes
from afina.train.memory import activation_bytes as memory_activation_bytes
from afina.train.optim import build_optimizer
from afina.train.task import TrainingTask


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def activation_bytes(
    config, tokens: int, label_tokens: int, checkpointing: bool, rows: int = 1, attention: str = "sdpa"
) -> int:
    """Activation memory of one bf16 micro-batch (train/memory.py: activation_bytes has the model)."""
    plan = MemoryPlan(method=None, rows=rows, tokens=tokens, gradient_checkpointing=checkpointing)
    return memory_activation_bytes(config, plan, label_tokens, attention)


def attention_flops_share(config, seq: int) -> float:
    """The share of a forward pass's matrix FLOPs spent in attention scores (QK^T and AV) at this length:
    per token 4*seq*hidden per layer against ~2*params for the weights; it grows linearly with seq."""
    hidden, inter, layers = (
        config.hidden_size,
        getattr(config, "intermediate_size", 4 * config.hidden_size),
        config.num_hidden_layers,
    )
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    weights = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter)
    attention = layers * 4 * seq * hidden / 2  # causal: half the score matrix on average
    return attention / (weights + attention)


def estimate(
    recipe: Recipe,
    task: TrainingTask | None = None,
    train_rows: list[dict[str, Any]] | None = None,
    measure_steps: int = 3,
    available: int | None = None,
    processes: int = 1,
    strategy: str | None = None,
    measure: bool = True,
    gpu: GpuSpec | None = None,
    mfu: float | None = None,
) -> dict[str, Any]:
    """Parameters and memory per process from the model's config (no weights read); with the prepared rows and
    the task type's TrainingTask (`afina.pipeline.estimate` builds it), the longest micro-batch sets the
    activations and (`measure`) a few timed steps give the run's duration.

    processes/strategy: the launch to estimate for (default: one process; training.distributed).
    gpu: estimate for that GPU instead of this device (train/gpus.py): its memory, and a time from the FLOPs
    at `mfu` (nothing is timed)."""
    run = RunDir(recipe.run_dir)
    cfg = recipe.training
    device = pick_device()
    precision: str
    weight_dtype: str
    if gpu is not None:
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if gpu.has_bf16 else "fp32")
        weight_dtype = recipe.model.dtype
        if weight_dtype == "auto":
            weight_dtype = "bfloat16" if precision == "bf16" else "float32"
        runtime, measure = CUDA_RUNTIME_BYTES, False
        available = int(gpu.memory_gib * GIB) if available is None else available
    else:
        precision = resolve_precision(cfg.precision, device)
        weight_dtype = recipe_weight_dtype(recipe, device)
        runtime = runtime_bytes(device)  # before anything big is loaded
    config = apply_rope_settings(model_config(recipe.model.name), recipe_rope_settings(recipe))
    plan = MemoryPlan(
        method=recipe.method,
        weight_dtype=weight_dtype,
        precision=precision,
        optimizer=cfg.optimizer,
        processes=processes,
        strategy=strategy or cfg.distributed,
        rows=cfg.batch_size,
        tokens=cfg.batch_size * (pack_settings(recipe)[0] or recipe.data.max_length),
        gradient_checkpointing=cfg.gradient_checkpointing,
        cpu_allocator=gpu is None,
    )
    result: dict[str, Any] = {}
    label_tokens = None
    model = None
    if task is not None and train_rows is not None:
        train_set = task.encode(train_rows)
        pack_length, continuous = pack_settings(recipe)
        collate_fn = task.collate or (
            lambda examples, rows, pad, length: collate(examples, rows, pad, length, continuous)
        )
        batches = epoch_batches(train_set, cfg.batch_size, random.Random(recipe.seed), pack_length)
        steps_per_epoch = max(1, math.ceil(len(batches) / (cfg.grad_accum * processes)))
        largest = max(batches, key=lambda rows: sum(len(train_set[i]["input_ids"]) for row in rows for i in row))
        largest_batch = collate_fn(train_set, largest, task.tokenizer.pad_token_id, pack_length)
        plan = plan.replace(rows=largest_batch["input_ids"].shape[0], tokens=largest_batch["input_ids"].numel())
        label_tokens = int((largest_batch["labels"] != -100).sum())
        result.update(
            train_examples=len(train_set),
            tokens_per_epoch=sum(len(e["input_ids"]) for e in train_set),
            steps_per_epoch=steps_per_epoch,
            total_steps=cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epoch_limit())),
            until_converged=cfg.until_converged(),
        )
    # A model with a new head is counted on the real model (the head is not in the config).
    head_task = (
        not task.builds_on_meta
        if task is not None
        else (recipe.task == "tagging" or (recipe.task == "classification" and recipe.classification.mode == "head"))
    )
    if head_task:
        if task is None:
            raise FileNotFoundError(
                f"{run.split_path('train')}: task '{recipe.task}' with a head is estimated on its "
                "real model, which needs the labels: run `afina prepare` first"
            )
        model = task.build_model(device)
    else:
        model = meta_model(config, recipe.method)
    memory = memory_estimate(config, plan, runtime, label_tokens, model=model)
    available = available_memory_bytes(device) if available is None else available
    fits = memory["total"] < 0.9 * available
    params = {id(p): p for p in model.parameters()}.values()
    rope = recipe_rope_settings(recipe)
    result.update(
        {
            "total_parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "memory_bytes": memory,
            "available_bytes": available,
            "fits": fits,
            "plan": {
                "method": recipe.method.type,
                "dtype": plan.weight_dtype,
                "precision": precision,
                "optimizer": plan.optimizer,
                "processes": processes,
                "strategy": plan.strategy if processes > 1 else None,
                "rows": plan.rows,
                "tokens": plan.tokens,
                "gradient_checkpointing": plan.gradient_checkpointing,
            },
            "sequence_length": plan.tokens // max(plan.rows, 1),
            "attention_flops_share": round(attention_flops_share(config, plan.tokens // max(plan.rows, 1)), 3),
            **({"rope_scaling": rope} if rope else {}),
            "precision": precision,
            "device": gpu.label if gpu is not None else str(device),
        }
    )
    if gpu is not None:
        if "total_steps" not in result and cfg.max_steps:
            result["total_steps"] = cfg.max_steps
        tokens_per_step = plan.tokens * cfg.grad_accum * processes
        result["gpu_time"] = gpu_time(config, result, gpu, recipe.method.type, mfu, tokens_per_step)
    if not fits:
        tries = [
            (label, total)
            for label, total in alternatives(config, plan, runtime, label_tokens, None if head_task else model)
            if total < memory["total"]
        ]
        result["try"] = tries
        result["warning"] = (
            f"the run needs about {memory['total'] / GIB:.1f} GiB per process but {available / GIB:.1f} GiB "
            "is available; "
            "try "
            + "; ".join(f"{label} ({total / GIB:.1f} GiB)" for label, total in tries[:4])
            + ("; or a shorter data.max_length" if tries else "a shorter data.max_length or a larger device")
        )
        return result
    if not (measure and task is not None):
        return result
    tokenizer = task.tokenizer
    model = task.build_model(device) if not head_task else model  # the real weights, for timing
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_steps = result["total_steps"]

    # Time a few real steps (after one warm-up step) on the first batches of an epoch.
    autocast = autocast_factory(precision, device)
    optimizer = build_optimizer([{"params": trainable}], cfg)
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
    mem, plan = result["memory_bytes"], result["plan"]
    launch = f"{plan['processes']} processes ({plan['strategy']})" if plan["processes"] > 1 else "one process"
    lines = [
        (
            f"parameters: {result['total_parameters']:,} total, {result['trainable_parameters']:,} trainable "
            f"({100 * result['trainable_parameters'] / result['total_parameters']:.2f}%)"
        ),
    ]
    if "train_examples" in result:
        lines.append(
            f"data: {result['train_examples']} examples, {result['tokens_per_epoch']:,} tokens per epoch, "
            f"{result['steps_per_epoch']} steps per epoch, "
            + (
                f"at most {result['total_steps']} steps (until validation stops improving, epoch cap)"
                if result.get("until_converged")
                else f"{result['total_steps']} steps in the run"
            )
        )
    lines += [
        (
            f"plan: {plan['method']}, weights {plan['dtype']}, compute {plan['precision']}, {plan['optimizer']}, "
            f"{launch}, "
            f"micro-batch {plan['rows']} x {result['sequence_length']} tokens"
            + (", gradient checkpointing" if plan["gradient_checkpointing"] else "")
        ),
        "memory per process (estimate): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in mem.items() if k != "total")
        + f"; total {mem['total'] / GIB:.2f} GiB of {result['available_bytes'] / GIB:.1f} GiB: "
        + ("fits" if result["fits"] else "does not fit"),
        (
            f"sequences: up to {result['sequence_length']} tokens per row; attention is "
            f"{100 * result['attention_flops_share']:.0f}% of the forward FLOPs at that length"
        )
        + (
            f"; rope scaling {result['rope_scaling']['rope_type']} x{result['rope_scaling']['factor']:g} "
            f"({result['rope_scaling']['original_length']} -> {result['rope_scaling']['target_length']} tokens)"
            if result.get("rope_scaling")
            else ""
        ),
    ]
    if "gpu_time" in result:
        lines.append(format_gpu_time(result["gpu_time"]))
    if "warning" in result:
        lines.append(f"WARNING: {result['warning']}")
    elif "expected_seconds" in result:
        minutes = result["expected_seconds"] / 60
        lines.append(
            f"time (from {result['precision']} steps measured on {result['device']}): "
            f"{result['seconds_per_step']} s/step, "
            f"{result['tokens_per_s']} tokens/s, "
            + ("at most " if result.get("until_converged") else "about ")
            + f"{minutes:.1f} min for the run; "
            f"peak memory while measuring {result['measured_peak_memory_mb']:.0f} MiB"
        )
    return "\n".join(lines)
