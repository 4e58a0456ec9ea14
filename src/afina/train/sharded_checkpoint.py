"""Checkpoints of an FSDP run, sharded: every process writes its own shards (torch.distributed.checkpoint).

A checkpoint folder `checkpoints/step-00000040/` holds `shards/` (the trainable weights and the
optimizer state, each process's part in its own file, written by DCP) and `state.pt` (scheduler,
random generators, the data order still to come, counters, and the process count), written by
rank 0. As for unsharded checkpoints (train/checkpoint.py) it is written into a temporary folder
and renamed into place once every process has finished, so a crash leaves whole checkpoints only.
No process gathers a whole tensor. A resumed run must use the same number of processes: the data
order still to come is dealt out by rank.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from afina.models.saved import require_tensors

PREFIX = "step-"


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(target: Path, is_main: bool, write) -> Path:
    """Every process calls this; write(tmp) writes its part; rank 0 renames tmp into place after all are done."""
    tmp = target.with_name(f".{target.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    _barrier()
    if is_main:
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def save_sharded_checkpoint(
    folder: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    rng: random.Random,
    extra: dict[str, Any],
    keep: int,
    is_main: bool,
) -> Path:
    """checkpoints/step-N with every process's shards; keeps the newest `keep`. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from afina.train.checkpoint import list_checkpoints

    def write(tmp: Path) -> None:
        require_tensors(_trainable(model), f"sharded checkpoint {tmp.parent}")
        state = {"model": _trainable(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp / "shards"))
        if is_main:
            torch.save(
                {
                    "step": step,
                    "scheduler": scheduler.state_dict(),
                    "python_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "world_size": dist.get_world_size(),
                    **extra,
                },
                tmp / "state.pt",
            )

    path = _write_atomic(folder / f"{PREFIX}{step:08d}", is_main, write)
    if is_main:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def check_layout(path: Path, sharded: bool) -> None:
    """A checkpoint resumes only the way it was written (sharded by FSDP, or whole)."""
    if (path / "shards").is_dir() != sharded:
        how = "an FSDP run (training.distributed=fsdp under torchrun)" if not sharded else "a run without FSDP"
        raise ValueError(f"{path}: this checkpoint was written by {how}; resume it the same way")


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random) -> dict[str, Any]:
    """Restore this process's shards of the weights and optimizer state, and the scheduler and random state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    check_layout(path, sharded=True)
    state = torch.load(path / "state.pt", weights_only=False)
    if state["world_size"] != dist.get_world_size():
        raise ValueError(
            f"{path}: written by {state['world_size']} processes, resumed with {dist.get_world_size()}; "
            f"resume with --nproc_per_node={state['world_size']} (the data still to come is dealt by rank)"
        )
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    dcp.load({"model": _trainable(model), "optimizer": optimizer_state}, checkpoint_id=str(path / "shards"))
    set_optimizer_state_dict(model, optimizer, optimizer_state)  # loaded in place above, into these tensors
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state


def save_sharded_weights(target: Path, model, info: dict[str, Any], is_main: bool) -> Path:
    """The trainable weights alone (the best checkpoint), sharded; every process calls it."""
    import torch.distributed.checkpoint as dcp

    def write(tmp: Path) -> None:
        require_tensors(_trainable(model), f"sharded checkpoint {tmp.parent}")
        dcp.save({"model": _trainable(model)}, checkpoint_id=str(tmp / "shards"))
        if is_main:
            torch.save(info, tmp / "info.pt")

    return _write_atomic(target, is_main, write)


def load_sharded_weights(target: Path, model) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": _trainable(model)}, checkpoint_id=str(target / "shards"))


def has_weights(target: Path) -> bool:
    return (target / "shards").is_dir()
