"""`afina train`: fine-tune the recipe's model on the prepared train split.

The flow: load data and model, build the optimizer and schedule, (resume from the newest
checkpoint,) then step: accumulate gradients over micro-batches, clip, update, validate,
log, checkpoint, stop early when validation stops improving. The loss math is in loss.py.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from afina.config import Recipe
from afina.data.format import encode_chat, encode_text_chunks
from afina.device import autocast_factory, peak_memory_mb, pick_device, progress_interval, resolve_precision
from afina.rundir import RunDir, read_jsonl
from afina.models.rope import recipe_rope_settings, save_rope_settings
from afina.train.batches import collate, epoch_batches, pack_settings
from afina.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    save_weights,
    trainable_state,
)
from afina.train.distributed import Distributed
from afina.train.loss import accumulate_gradients, count_label_tokens, label_token_loss, mean_label_loss
from afina.train.monitor import TrainingMonitor


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was saved and the run can be resumed."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def encode_split(tokenizer, rows: list[dict[str, Any]], train_on: str, recipe: Recipe | None = None) -> list[dict[str, list[int]]]:
    """Chats (loss where train_on says), or plain text rows (loss on every token, then end-of-sequence).
    `task: domain`: each document cut into chunks of tokens."""
    if recipe is not None and recipe.task == "domain":
        length, domain = recipe.chunk_length(), recipe.domain
        return [chunk for row in rows for chunk in encode_text_chunks(tokenizer, row["text"], length, domain.overlap, domain.add_eos)]
    return [encode_chat(tokenizer, row["messages"], train_on) if "messages" in row else encode_text(tokenizer, row["text"])
            for row in rows]


def add_retrieval_rows(recipe: Recipe, tokenizer, train_rows, train_set, pack_length: int | None) -> int:
    """context.retrieval: append synthetic key-retrieval rows (afina.train.retrieval) to the encoded
    training set, in place; returns how many."""
    cfg = recipe.context.retrieval
    from afina.train.retrieval import retrieval_count, retrieval_examples, row_texts

    count = retrieval_count(cfg.fraction, train_set, pack_length)
    if count:
        train_set += retrieval_examples(tokenizer, row_texts(train_rows), count, pack_length or recipe.data.max_length,
                                        cfg.min_length, cfg.facts, recipe.seed)
    return count


def encode_text(tokenizer, text: str) -> dict[str, list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def make_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(recipe.training.scheduler, recipe.training.scheduler)
    warmup = int(round(recipe.training.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(recipe: Recipe, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    from afina.config import RecipeError
    from afina.tasks import training_task

    run = RunDir(recipe.run_dir)
    cfg = recipe.training
    seed_everything(recipe.seed)
    ddp = Distributed.from_env(cfg.distributed)
    device = pick_device()
    if device.type == "cuda" and ddp.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(cfg.precision, device)
    autocast = autocast_factory(precision, device)

    train_rows = read_jsonl(run.require(run.split_path("train"), "prepare"))
    val_rows = read_jsonl(run.require(run.split_path("validation"), "prepare"))
    if not train_rows:
        raise ValueError(f"{run.split_path('train')} has no rows: give more data or a larger data.split.train")
    # What differs per task type (examples, model, loss); everything below is the same loop for all.
    task = training_task(recipe, run, train_rows)
    tokenizer = task.tokenizer
    train_set = task.encode(train_rows)
    val_set = task.encode(val_rows)
    pack_length, continuous = pack_settings(recipe)
    retrieval_rows = add_retrieval_rows(recipe, tokenizer, train_rows, train_set, pack_length)
    if cfg.packing and not task.supports_packing:
        raise RecipeError(f"training.packing: task '{recipe.task}' with a head pools or tags per example and cannot "
                          "pack examples together; set training.packing=false")

    # Master weights stay fp32; matmuls run in bf16 under autocast (faster on this CPU than a bf16 copy).
    rope = recipe_rope_settings(recipe)  # context extension: scaled rotary positions, saved with the result
    model = task.build_model(device)  # the task applies `rope` too
    ddp.shard(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        model.get_decoder().compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = task.param_groups(model) if task.param_groups else [{"params": trainable}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    collate_fn = task.collate or (lambda examples, rows, pad, length: collate(examples, rows, pad, length, continuous))
    loss_fn, count_fn = task.loss_fn or label_token_loss, task.count_fn or count_label_tokens

    batches_per_epoch = len(epoch_batches(train_set, cfg.batch_size, random.Random(recipe.seed), pack_length))
    per_step = cfg.grad_accum * ddp.world_size  # micro-batches in one global optimizer step
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / per_step))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    scheduler = make_scheduler(optimizer, recipe, total_steps)
    rng = random.Random(recipe.seed)
    pad_id = tokenizer.pad_token_id
    checkpoints = run.root / "checkpoints"

    def validation_loss() -> float | None:
        if not val_set:
            return None
        model.eval()
        loss = mean_label_loss(model, val_set, pad_id, cfg.batch_size, autocast, loss_fn=loss_fn)
        model.train()
        return loss

    loop: dict[str, Any] = {"step": 0, "tokens": 0, "queue": [], "best_val": None, "bad_evals": 0, "train_time": 0.0}
    resumed_from = None
    if resume:
        found = list_checkpoints(checkpoints)
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {checkpoints}; run `afina train` without --resume")
        resumed_from = found[-1]
        loop.update(load_checkpoint(resumed_from, model, optimizer, scheduler, rng)["loop"])
    else:
        loop["val_before"] = validation_loss()

    def save(step: int) -> None:
        # Every process holds the same weights (FSDP: gathers its shards for this); one writes them.
        save_checkpoint(checkpoints, step, model, optimizer, scheduler, rng, {"loop": loop}, cfg.keep_checkpoints,
                        write_files=ddp.is_main)

    if ddp.is_main:
        monitor = TrainingMonitor(run.root, run.metrics, loop["step"] if resume else None, cfg.tensorboard, cfg.plots)
    else:
        monitor = TrainingMonitor.silent()
    bar = tqdm(total=total_steps, initial=loop["step"], desc="train", unit="step", disable=not (progress and ddp.is_main),
               mininterval=progress_interval())
    model.train()
    started, stop_reason, last_loss = time.perf_counter(), "finished", float("nan")
    with stop_requests() as stop:
        while loop["step"] < total_steps:
            if stop["signal"]:
                # The training time so far goes into the checkpoint, so a resumed run reports true tokens/s.
                loop["train_time"], started = loop["train_time"] + time.perf_counter() - started, time.perf_counter()
                save(loop["step"])
                raise TrainingInterrupted(
                    f"{stop['signal']} received: checkpoint saved at step {loop['step']}; "
                    "continue with `afina train --resume` on the same recipe"
                )
            while len(loop["queue"]) < per_step:
                loop["queue"] += epoch_batches(train_set, cfg.batch_size, rng, pack_length)
            step_rows = loop["queue"][:per_step]
            del loop["queue"][:per_step]
            group = [collate_fn(train_set, rows, pad_id, pack_length) for rows in step_rows]
            local = group[ddp.rank :: ddp.world_size]
            step_loss, _ = accumulate_gradients(model, local, autocast, denominator=count_fn(group), loss_fn=loss_fn,
                                                count_fn=count_fn)
            step_loss = ddp.sum_scalar(step_loss)
            ddp.sum_gradients(trainable)
            grad_norm = ddp.clip_grad_norm(trainable, cfg.max_grad_norm)
            if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
                kept = list_checkpoints(checkpoints)
                raise FloatingPointError(
                    f"the loss became {step_loss} (gradient norm {grad_norm}) at step {loop['step'] + 1}, so training "
                    "stopped before that update"
                    + (f"; the last good checkpoint is {kept[-1]}" if kept else "")
                    + ". Check the data and the model weights, or lower training.learning_rate"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop["step"] += 1
            loop["tokens"] += sum(len(train_set[i]["input_ids"]) for rows in step_rows for row in rows for i in row)
            step = loop["step"]
            last_loss = step_loss
            elapsed = loop["train_time"] + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{loop['tokens'] / elapsed:.0f}", mem=f"{peak_memory_mb(device):.0f}MB", refresh=False)

            time_up = bool(cfg.max_minutes) and elapsed >= cfg.max_minutes * 60 and step < total_steps
            val_loss = validation_loss() if (step % eval_every == 0 or step == total_steps or time_up) else None
            if val_loss is not None:
                loop["val_last"] = val_loss
                if loop["best_val"] is None or val_loss < loop["best_val"]:
                    loop["best_val"], loop["best_step"], loop["bad_evals"] = val_loss, step, 0
                    save_weights(checkpoints / "best", model, {"step": step, "val_loss": val_loss}, write_files=ddp.is_main)
                else:
                    loop["bad_evals"] += 1
            if step % cfg.log_every == 0 or val_loss is not None or step == total_steps:
                monitor.log(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 3),
                        "loss": round(step_loss, 5),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": round(grad_norm, 4),
                        "tokens": loop["tokens"],
                        "tokens_per_s": round(loop["tokens"] / elapsed, 1),
                        "peak_memory_mb": round(peak_memory_mb(device), 1),
                        **({"val_loss": val_loss} if val_loss is not None else {}),
                    }
                )
            if val_loss is not None:
                monitor.plot()
            patience = cfg.early_stopping_patience
            if patience and loop["bad_evals"] >= patience:
                stop_reason = f"early stopping: no better validation loss in {patience} validations"
            if time_up:
                stop_reason = f"time limit: training.max_minutes={cfg.max_minutes} reached at step {step} of {total_steps}"
            if step % save_every == 0 or step == total_steps or stop_reason != "finished":
                loop["train_time"], started = elapsed, time.perf_counter()
                save(step)
            if stop_reason != "finished":
                break
    bar.close()
    monitor.close()
    elapsed = loop["train_time"] + time.perf_counter() - started

    ddp.barrier()  # the best weights are on disk before any process reads them
    best = checkpoints / "best"
    if cfg.load_best_at_end and (best / "trainable.safetensors").is_file() and loop.get("best_step") != loop["step"]:
        from safetensors.torch import load_file

        load_trainable_state(model, load_file(str(best / "trainable.safetensors")))
    out_dir = task.output_dir
    summary = {
        "task": recipe.task,
        "method": task.method,
        **task.extra_summary,
        "steps": loop["step"],
        "epochs": round(loop["step"] / steps_per_epoch, 2),
        "stopped": stop_reason,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "train_examples": len(train_set),
        **({"retrieval_rows": retrieval_rows} if retrieval_rows else {}),
        "packing": bool(pack_length),
        "tokens": loop["tokens"],
        "tokens_per_s": round(loop["tokens"] / max(elapsed, 1e-9), 1),
        "final_train_loss": round(last_loss, 5),
        "val_loss_before": loop.get("val_before"),
        "val_loss_after": loop.get("val_last"),
        "best_val_loss": loop["best_val"],
        "best_step": loop.get("best_step"),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "precision": precision,
        "device": str(device),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "output": str(out_dir),
        "processes": ddp.world_size,
        "distributed": ddp.strategy if ddp.world_size > 1 else None,
        **({"rope_scaling": rope, "pack_length": pack_length} if rope else {}),
    }
    to_save = model
    if ddp.sharded:  # gather the shards (every process) into a plain copy that peft/transformers can save
        whole = trainable_state(model)
        if ddp.is_main:
            to_save = task.build_model(torch.device("cpu"))
            load_trainable_state(to_save, whole)
    if ddp.is_main:
        to_save.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if task.on_save:
            task.on_save(out_dir)
        save_rope_settings(out_dir, rope)
        run.update_manifest(train=summary)
    ddp.close()
    return summary
