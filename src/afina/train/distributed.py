"""Data parallelism over processes started by torchrun (gloo on CPU, NCCL on GPUs).

Every process holds the whole data and draws the same batch order; a global step's
micro-batches are dealt out by rank. Each process divides its loss by the label tokens of the
whole global step, so summing the gradients across processes gives exactly the gradient of
one process that ran all those micro-batches with gradient accumulation. The sum is torch's
DistributedDataParallel's: gradients all-reduced in buckets while the backward pass still runs,
skipped (no_sync) on all but the last micro-batch of a step, with a communication hook that sums
where DDP would average.

Every collective afina runs takes a tensor on `collective_device()`: NCCL takes CUDA tensors only,
gloo CPU ones, so a scalar built on the CPU would stop a GPU run at its first step.

With `training.distributed: fsdp` each decoder layer, and then the rest of the model (embeddings,
final norm, output layer), is sharded with PyTorch's FSDP2 (`fully_shard`): weights, gradients and
optimizer state are split across the processes and gathered only while a layer runs. Gradients are
reduce-scattered summed (not averaged), so the same loss normalisation holds. train/fsdp.py builds
the model on the meta device and loads only each process's shards.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def collective_device() -> torch.device:
    """The device the process group's backend takes tensors on: CUDA for NCCL, the CPU for gloo."""
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_gradients_hook(state, bucket):
    """DDP's all-reduce of one bucket as a plain sum (DDP's own hook divides by the world size; afina's loss
    is already normalised by the whole global step's labels)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _LossModule(torch.nn.Module):
    """The model and its loss as one module, so DDP's forward sees every call the loss makes into the model
    (the loss runs the decoder and then the output layer in chunks, not model.forward)."""

    def __init__(self, model, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, **batch):
        return self.loss_fn(self.model, **batch)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(strategy=strategy)
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), strategy)

    def shard(self, model) -> None:
        """FSDP: shard every decoder layer and the rest in place (a no-op for DDP or a single process).
        A model built whole first; train/fsdp.py builds one that never is."""
        if not self.sharded:
            return
        from afina.train.fsdp import shard_model, start_root

        shard_model(model)
        start_root(model)

    def data_parallel(self, model, loss_fn: Callable) -> tuple[Callable, Callable]:
        """(loss_fn, no_sync) for training: with several unsharded processes, the loss runs through torch's
        DDP (gradients summed in buckets during the backward, nothing sent under no_sync()); else as given.
        FSDP reduce-scatters its own shards."""
        if self.world_size == 1 or self.sharded:
            return loss_fn, contextlib.nullcontext
        from torch.nn.parallel import DistributedDataParallel

        device = next(p for p in model.parameters() if p.requires_grad).device
        # Every process built the same model from the same seed: no broadcast of the whole base model at the
        # start (init_sync) and no buffer sync before each forward (torch 2.13 renamed broadcast_buffers).
        options = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync: dict[str, Any] = {
            "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers": False
        }
        wrapped = DistributedDataParallel(
            _LossModule(model, loss_fn),
            device_ids=[device] if device.type == "cuda" else None,
            init_sync=False,
            **no_buffer_sync,
        )
        wrapped.register_comm_hook(None, _sum_gradients_hook)
        return (lambda _model, **batch: wrapped(**batch)), wrapped.no_sync

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """Global gradient L2 norm over whole and sharded gradients; scale them down to max_norm."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
        device = grads[0].device if grads else torch.device("cpu")
        sharded = torch.zeros((), device=device)
        whole = torch.zeros((), device=device)
        for g in grads:
            if isinstance(g, DTensor):
                sharded += g.to_local().float().pow(2).sum()
            else:
                whole += g.float().pow(2).sum()
        reduced = sharded.to(collective_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        norm = float(torch.sqrt(reduced.to(whole.device) + whole))
        if max_norm is not None:  # the same rule as torch.nn.utils.clip_grad_norm_
            scale = min(max_norm / (norm + 1e-6), 1.0)
            for g in grads:
                g.mul_(scale)
        return norm

    def sum_scalar(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
