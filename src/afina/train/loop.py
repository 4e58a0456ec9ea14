"""`afina train`: fine-tune the recipe's model on the prepared train split.

The flow: `setup` (data, model, optimizer and schedule, resume from the newest checkpoint),
then `run_steps` (accumulate gradients over micro-batches, clip, update; after each step
`after_step` validates, logs, checkpoints and decides to stop early), then `finish` (best
weights back, save the result, the summary). The task type (afina.tasks) hands the loop a
TrainingTask with its examples, model and loss; the loss math is in loss.py.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from afina.config import FALLBACK_EPOCHS, Recipe, RecipeError
from afina.device import (
    autocast_factory,
    peak_memory_mb,
    pick_device,
    progress_interval,
    recipe_weight_dtype,
    resolve_precision,
)
from afina.models import recipe_rope_settings
from afina.models.rope import save_rope_settings
from afina.models.saved import require_saved_weights
from afina.rundir import RunDir, read_jsonl
from afina.train.batches import collate, epoch_batches, pack_settings
from afina.train.checkpoint import (
    list_checkpoints,
    load_trainable_state,
    resume_checkpoint,
    save_checkpoint,
    save_weights,
    trainable_state,
)
from afina.train.distributed import Distributed, collective_device
from afina.train.fsdp import build_sharded_model, held_bytes, max_over_processes, save_streamed_result
from afina.train.loss import accumulate_gradients, count_label_tokens, label_token_loss, mean_label_loss
from afina.train.monitor import TrainingMonitor
from afina.train.optim import build_optimizer
from afina.train.sharded_checkpoint import (
    check_layout,
    has_weights,
    load_sharded_weights,
    resume_sharded_checkpoint,
    save_sharded_checkpoint,
    save_sharded_weights,
)
from afina.train.task import TrainingTask
from afina.train.trackers import check_trackers


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was saved and the run can be resumed."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def read_splits(run: RunDir) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prepared train and validation rows (a clear error when `afina prepare` has not run)."""
    train_rows = read_jsonl(run.require(run.split_path("train"), "prepare"))
    val_rows = read_jsonl(run.require(run.split_path("validation"), "prepare"))
    if not train_rows:
        raise ValueError(f"{run.split_path('train')} has no rows: give more data or a larger data.split.train")
    return train_rows, val_rows


def add_retrieval_rows(recipe: Recipe, tokenizer, train_rows, train_set, pack_length: int | None) -> int:
    """context.retrieval: append synthetic key-retrieval rows (afina.train.retrieval) to the encoded
    training set, in place; returns how many."""
    from afina.train.retrieval import retrieval_count, retrieval_examples, row_texts

    cfg = recipe.context.retrieval
    count = retrieval_count(cfg.fraction, train_set, pack_length)
    if count:
        train_set += retrieval_examples(
            tokenizer,
            row_texts(train_rows),
            count,
            pack_length or recipe.data.max_length,
            cfg.min_length,
            cfg.facts,
            recipe.seed,
        )
    return count


def make_scheduler(optimizer, recipe: Recipe, total_steps: int, steps_per_epoch: int | None = None):
    """The learning-rate schedule over the run. A run until convergence (no length given) plans over its epoch
    cap, so the rate stays near its peak while validation improves; its warmup is that of a run of
    FALLBACK_EPOCHS epochs, not a share of the cap."""
    from transformers import get_scheduler

    cfg = recipe.training
    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    basis = total_steps
    if cfg.until_converged() and steps_per_epoch:
        basis = min(total_steps, steps_per_epoch * FALLBACK_EPOCHS)
    warmup = int(round(cfg.warmup_ratio * basis))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@contextmanager
def stop_requests() -> Iterator[dict[str, str | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""
    flag: dict[str, str | None] = {"signal": None}
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


@dataclass
class LoopState:
    """The counters and history a checkpoint saves (as a plain dict) and a resumed run restores."""

    step: int = 0
    tokens: int = 0
    queue: list = field(default_factory=list)  # the batches still to come in this epoch's order
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    train_time: float = 0.0  # seconds of training before the current stretch (resumes add up)
    val_before: float | None = None
    val_last: float | None = None
    held_bytes: dict | None = None  # parameters, gradients, optimizer state after the first step (largest process)


@dataclass
class Training:
    """Everything `setup` builds and the steps use."""

    recipe: Recipe
    task: TrainingTask
    run: RunDir
    ddp: Distributed
    device: torch.device
    precision: str
    autocast: Callable
    model: Any
    trainable: list
    optimizer: Any
    scheduler: Any
    rng: random.Random
    train_set: list[dict[str, list[int]]]
    val_set: list[dict[str, list[int]]]
    pack_length: int | None
    collate_fn: Callable
    loss_fn: Callable
    count_fn: Callable
    train_loss_fn: Callable  # loss_fn through torch's DDP when several unsharded processes train
    no_sync: Callable  # DDP's no_sync (gradients kept local) for all but a step's last micro-batch
    per_step: int  # micro-batches in one global optimizer step
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    retrieval_rows: int
    rope: dict | None
    state: LoopState
    resumed_from: Any = None
    started: float = 0.0  # perf_counter at the start of the current stretch

    @property
    def checkpoints(self):
        return self.run.root / "checkpoints"

    def elapsed(self) -> float:
        return self.state.train_time + time.perf_counter() - self.started

    def save(self, step: int, elapsed: float | None = None) -> None:
        """A checkpoint; the training time so far (`elapsed`, default now) goes into it, so a resumed run
        reports true tokens/s."""
        self.state.train_time = self.elapsed() if elapsed is None else elapsed
        self.started = time.perf_counter()
        if self.ddp.sharded:  # every process writes its own shards
            save_sharded_checkpoint(
                self.checkpoints,
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.rng,
                {"loop": asdict(self.state)},
                self.recipe.training.keep_checkpoints,
                is_main=self.ddp.is_main,
            )
            return
        # Every process holds the same weights; one writes them.
        save_checkpoint(
            self.checkpoints,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.rng,
            {"loop": asdict(self.state)},
            self.recipe.training.keep_checkpoints,
            write_files=self.ddp.is_main,
        )

    def validation_loss(self) -> float | None:
        if not self.val_set:
            return None
        self.model.eval()
        loss = mean_label_loss(
            self.model,
            self.val_set,
            self.task.tokenizer.pad_token_id,
            self.recipe.training.batch_size,
            self.autocast,
            loss_fn=self.loss_fn,
            collate=self.task.collate,
        )
        self.model.train()
        return loss


def train(
    recipe: Recipe,
    task: TrainingTask,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `task` (from afina.tasks: `afina.pipeline.train` builds it) on the rows; returns the summary."""
    check_trackers(recipe.training.report_to)  # a tracker not installed stops here, before the model loads
    t = setup(recipe, task, train_rows, val_rows, resume)
    monitor = (
        TrainingMonitor(
            t.run.root,
            t.run.metrics,
            t.state.step if resume else None,
            recipe.training.report_to,
            recipe.training.plots,
            recipe.model_dump(mode="json", by_alias=True),
        )
        if t.ddp.is_main
        else TrainingMonitor.silent()
    )
    bar = tqdm(
        total=t.total_steps,
        initial=t.state.step,
        desc="train",
        unit="step",
        disable=not (progress and t.ddp.is_main),
        mininterval=progress_interval(),
    )
    t.model.train()
    t.started = time.perf_counter()
    failed = True
    try:
        stop_reason, last_loss = run_steps(t, monitor, bar)
        failed = False
    finally:
        bar.close()
        monitor.close(failed)
    return finish(t, stop_reason, last_loss)


def setup(recipe: Recipe, task: TrainingTask, train_rows, val_rows, resume: bool) -> Training:
    cfg = recipe.training
    seed_everything(recipe.seed)
    ddp = Distributed.from_env(cfg.distributed)
    device = pick_device()
    if device.type == "cuda" and ddp.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(cfg.precision, device)
    train_set, val_set = task.encode(train_rows), task.encode(val_rows)
    pack_length, continuous = pack_settings(recipe)
    retrieval_rows = add_retrieval_rows(recipe, task.tokenizer, train_rows, train_set, pack_length)
    if cfg.packing and not task.supports_packing:
        raise RecipeError(
            f"training.packing: task '{recipe.task}' with a head pools or tags per example and cannot "
            "pack examples together; set training.packing=false"
        )

    # Weights in model.dtype (train/precision.py); matmuls in training.precision under autocast.
    rope = recipe_rope_settings(recipe)  # context extension: scaled rotary positions, saved with the result
    if ddp.sharded and task.builds_on_meta:  # FSDP: built on the meta device, each process loads only its shards
        model = build_sharded_model(
            task.build_model,
            recipe.model.name,
            device,
            recipe_weight_dtype(recipe, device),
            recipe.method.type == "full",
            recipe.seed,
        )
    else:
        model = task.build_model(device)  # the task applies `rope` too
        ddp.shard(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        model.get_decoder().compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = task.param_groups(model) if task.param_groups else [{"params": trainable}]
    optimizer = build_optimizer(groups, cfg)

    batches_per_epoch = len(epoch_batches(train_set, cfg.batch_size, random.Random(recipe.seed), pack_length))
    per_step = cfg.grad_accum * ddp.world_size
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / per_step))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epoch_limit(bool(val_set))))
    eval_every = cfg.eval_every or steps_per_epoch
    loss_fn = task.loss_fn or label_token_loss
    train_loss_fn, no_sync = ddp.data_parallel(model, loss_fn)
    t = Training(
        recipe=recipe,
        task=task,
        run=RunDir(recipe.run_dir),
        ddp=ddp,
        device=device,
        precision=precision,
        autocast=autocast_factory(precision, device),
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, recipe, total_steps, steps_per_epoch),
        rng=random.Random(recipe.seed),
        train_set=train_set,
        val_set=val_set,
        pack_length=pack_length,
        collate_fn=task.collate
        or (lambda examples, rows, pad, length: collate(examples, rows, pad, length, continuous)),
        loss_fn=loss_fn,
        count_fn=task.count_fn or count_label_tokens,
        train_loss_fn=train_loss_fn,
        no_sync=no_sync,
        per_step=per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=eval_every,
        save_every=cfg.save_every or eval_every,
        retrieval_rows=retrieval_rows,
        rope=rope,
        state=LoopState(),
    )
    if resume:
        if ddp.sharded:  # every process reads its own shards
            t.resumed_from, saved = resume_sharded_checkpoint(t.checkpoints, model, optimizer, t.scheduler, t.rng)
        else:
            newest = list_checkpoints(t.checkpoints)
            if newest:
                check_layout(newest[-1], sharded=False)
            t.resumed_from, saved = resume_checkpoint(t.checkpoints, model, optimizer, t.scheduler, t.rng)
        t.state = LoopState(**saved["loop"])
    else:
        t.state.val_before = t.validation_loss()
    return t


def run_steps(t: Training, monitor: TrainingMonitor, bar) -> tuple[str, float]:
    """Optimizer steps until the last one, early stopping, the time limit or a signal; (stop reason, last loss)."""
    stop_reason, last_loss = "finished", float("nan")
    with stop_requests() as stop:
        while t.state.step < t.total_steps:
            if stop["signal"]:
                t.save(t.state.step)
                raise TrainingInterrupted(
                    f"{stop['signal']} received: checkpoint saved at step {t.state.step}; "
                    "continue with `afina train --resume` on the same recipe"
                )
            last_loss, grad_norm = training_step(t)
            bar.update(1)
            bar.set_postfix(
                loss=f"{last_loss:.3f}",
                tok_s=f"{t.state.tokens / t.elapsed():.0f}",
                mem=f"{peak_memory_mb(t.device):.0f}MB",
                refresh=False,
            )
            stop_reason = after_step(t, last_loss, grad_norm, monitor)
            if stop_reason != "finished":
                break
    return stop_reason, last_loss


def training_step(t: Training) -> tuple[float, float]:
    """One global optimizer step over `per_step` micro-batches (dealt out by rank); (loss, gradient norm)."""
    cfg, state = t.recipe.training, t.state
    while len(state.queue) < t.per_step:
        state.queue += epoch_batches(t.train_set, cfg.batch_size, t.rng, t.pack_length)
    step_rows = state.queue[: t.per_step]
    del state.queue[: t.per_step]
    group = [t.collate_fn(t.train_set, rows, t.task.tokenizer.pad_token_id, t.pack_length) for rows in step_rows]
    local = group[t.ddp.rank :: t.ddp.world_size]
    step_loss, _ = accumulate_gradients(
        t.model,
        local,
        t.autocast,
        denominator=t.count_fn(group),
        loss_fn=t.train_loss_fn,
        count_fn=t.count_fn,
        no_sync=t.no_sync,
    )
    step_loss = t.ddp.sum_scalar(step_loss)  # the gradients were summed by DDP during the backward
    grad_norm = t.ddp.clip_grad_norm(t.trainable, cfg.max_grad_norm)
    if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
        kept = list_checkpoints(t.checkpoints)
        raise FloatingPointError(
            f"the loss became {step_loss} (gradient norm {grad_norm}) at step {state.step + 1}, so training "
            "stopped before that update"
            + (f"; the last good checkpoint is {kept[-1]}" if kept else "")
            + ". Check the data and the model weights, or lower training.learning_rate"
        )
    t.optimizer.step()
    if state.held_bytes is None:  # what each process holds at its fullest (gradients not yet freed)
        state.held_bytes = max_over_processes(held_bytes(t.model, t.optimizer), collective_device())
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += sum(len(t.train_set[i]["input_ids"]) for rows in step_rows for row in rows for i in row)
    return step_loss, grad_norm


def after_step(t: Training, step_loss: float, grad_norm: float, monitor: TrainingMonitor) -> str:
    """Validate, keep the best weights, log, checkpoint; the stop reason ("finished" to go on)."""
    cfg, state = t.recipe.training, t.state
    step, elapsed = state.step, t.elapsed()
    time_up = cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60 and step < t.total_steps
    val_loss = t.validation_loss() if (step % t.eval_every == 0 or step == t.total_steps or time_up) else None
    if val_loss is not None:
        state.val_last = val_loss
        if state.best_val is None or val_loss < state.best_val:
            state.best_val, state.best_step, state.bad_evals = val_loss, step, 0
            info = {"step": step, "val_loss": val_loss}
            if t.ddp.sharded:
                save_sharded_weights(t.checkpoints / "best", t.model, info, is_main=t.ddp.is_main)
            else:
                save_weights(t.checkpoints / "best", t.model, info, write_files=t.ddp.is_main)
        else:
            state.bad_evals += 1
    if step % cfg.log_every == 0 or val_loss is not None or step == t.total_steps:
        monitor.log(
            {
                "step": step,
                "epoch": round(step / t.steps_per_epoch, 3),
                "loss": round(step_loss, 5),
                "lr": t.scheduler.get_last_lr()[0],
                "grad_norm": round(grad_norm, 4),
                "tokens": state.tokens,
                "tokens_per_s": round(state.tokens / elapsed, 1),
                "peak_memory_mb": round(peak_memory_mb(t.device), 1),
                **({"val_loss": val_loss} if val_loss is not None else {}),
            }
        )
    if val_loss is not None:
        monitor.plot()
    stop_reason = "finished"
    patience = cfg.patience()
    if patience and state.bad_evals >= patience:
        stop_reason = f"early stopping: no better validation loss in {patience} validations"
    if time_up:
        stop_reason = f"time limit: training.max_minutes={cfg.max_minutes} reached at step {step} of {t.total_steps}"
    if step % t.save_every == 0 or step == t.total_steps or stop_reason != "finished":
        t.save(step, elapsed)
    return stop_reason


def finish(t: Training, stop_reason: str, last_loss: float) -> dict[str, Any]:
    """The best weights back (load_best_at_end), the result saved by the main process, the summary."""
    elapsed = t.elapsed()
    t.ddp.barrier()  # the best weights are on disk before any process reads them
    best = t.checkpoints / "best"
    load_best = t.recipe.training.load_best_at_end and t.state.best_step != t.state.step
    if load_best and t.ddp.sharded and has_weights(best):
        load_sharded_weights(best, t.model)
    elif load_best and (best / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        load_trainable_state(t.model, load_file(str(best / "trainable.safetensors")))
    summary = training_summary(t, stop_reason, last_loss, elapsed)
    to_save = t.model
    if t.ddp.sharded and t.task.builds_on_meta:  # written whole from the shards, one tensor at a time
        save_streamed_result(
            t.model,
            t.task.output_dir,
            t.recipe.method.type,
            write=t.ddp.is_main,
            dtype=getattr(torch, recipe_weight_dtype(t.recipe, t.device)),
        )
        to_save = None
    elif t.ddp.sharded:  # gather the shards (every process) into a plain copy that peft/transformers can save
        whole = trainable_state(t.model)
        if t.ddp.is_main:
            to_save = t.task.build_model(torch.device("cpu"))
            load_trainable_state(to_save, whole)
    if t.ddp.is_main:
        out_dir = t.task.output_dir
        if to_save is not None:
            to_save.save_pretrained(out_dir, safe_serialization=True)
        require_saved_weights(out_dir)
        t.task.tokenizer.save_pretrained(out_dir)
        if t.task.on_save:
            t.task.on_save(out_dir)
        save_rope_settings(out_dir, t.rope)
        t.run.update_manifest(train=summary)
    t.ddp.close()
    return summary


def training_length(t: Training) -> str:
    """What a run without training.epochs / max_steps did instead: how it decided when to stop."""
    cfg = t.recipe.training
    if not t.val_set:
        return (
            f"no training.epochs or max_steps given and no validation split to stop on: "
            f"{cfg.epoch_limit(False):g} epochs"
        )
    return (
        f"no training.epochs or max_steps given: trained until validation stopped improving (early stopping after "
        f"{cfg.patience()} validations without a lower loss, at most {cfg.epoch_limit():g} epochs), best weights kept"
    )


def training_summary(t: Training, stop_reason: str, last_loss: float, elapsed: float) -> dict[str, Any]:
    state = t.state
    return {
        "task": t.recipe.task,
        "method": t.task.method,
        **t.task.extra_summary,
        "steps": state.step,
        "epochs": round(state.step / t.steps_per_epoch, 2),
        "stopped": stop_reason,
        **({"length": training_length(t)} if t.recipe.training.until_converged() else {}),
        "resumed_from": str(t.resumed_from) if t.resumed_from else None,
        "train_examples": len(t.train_set),
        **({"retrieval_rows": t.retrieval_rows} if t.retrieval_rows else {}),
        "packing": bool(t.pack_length),
        "tokens": state.tokens,
        "tokens_per_s": round(state.tokens / max(elapsed, 1e-9), 1),
        "final_train_loss": round(last_loss, 5),
        "val_loss_before": state.val_before,
        "val_loss_after": state.val_last,
        "best_val_loss": state.best_val,
        "best_step": state.best_step,
        "trainable_parameters": sum(p.numel() for p in t.trainable),
        "total_parameters": sum(p.numel() for p in t.model.parameters()),
        "precision": t.precision,
        "device": str(t.device),
        "peak_memory_mb": round(peak_memory_mb(t.device), 1),
        "held_bytes_per_process": state.held_bytes,  # parameters, gradients, optimizer state (the largest process)
        "output": str(t.task.output_dir),
        "processes": t.ddp.world_size,
        "distributed": t.ddp.strategy if t.ddp.world_size > 1 else None,
        **({"rope_scaling": t.rope, "pack_length": t.pack_length} if t.rope else {}),
    }
