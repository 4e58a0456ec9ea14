"""Resumable training state, written atomically.

A checkpoint is a folder `checkpoints/step-00000040/` holding the trainable weights
(safetensors) and everything else a resumed run needs to continue exactly as if it had never
stopped: optimizer, scheduler, random generators, the data order still to come, counters and
history (state.pt). It is written into a temporary folder and renamed into place, so a crash
mid-write leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

PREFIX = "step-"


def _is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def is_sharded_model(model) -> bool:
    return any(_is_sharded(p) for p in model.parameters())


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights as whole CPU tensors. With FSDP every process must call this (it gathers)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.detach().full_tensor() if _is_sharded(p) else p.detach()
            out[name] = whole.cpu().contiguous()
    return out


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the model; FSDP-sharded parameters take their own shard of each."""
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing:
        raise ValueError(f"the checkpoint does not match this model/method: {len(missing)} trainable tensors missing, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            param = params[name]
            if _is_sharded(param):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer's state; with FSDP gathered whole (keyed by parameter name) on every process."""
    if is_sharded_model(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    # FSDP checkpoints key the optimizer state by parameter name, the others by position.
    written_by_fsdp = any(isinstance(key, str) for key in state.get("state", {}))
    if written_by_fsdp != is_sharded_model(model):
        how = "an FSDP run (training.distributed=fsdp under torchrun)" if written_by_fsdp else "a run without FSDP"
        raise ValueError(f"this checkpoint was written by {how}; resume it the same way")
    if is_sharded_model(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _write_atomic_dir(target: Path, write) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_checkpoint(
    folder: Path, step: int, model, optimizer, scheduler, rng: random.Random, extra: dict[str, Any], keep: int,
    write_files: bool = True,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep` of them.

    In a distributed run every process calls this (FSDP gathers the shards); only the process
    with write_files=True writes.
    """
    path = folder / f"{PREFIX}{step:08d}"
    if not write_files and not is_sharded_model(model):
        return path
    tensors, optim = trainable_state(model), optimizer_state(model, optimizer)  # gathers under FSDP
    if not write_files:
        return path

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "step": step,
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "python_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                **extra,
            },
            tmp / "state.pt",
        )

    _write_atomic_dir(path, write)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_weights(target: Path, model, info: dict[str, Any], write_files: bool = True) -> Path:
    """The trainable weights alone (the best checkpoint), atomically; every process calls it under FSDP."""
    if not write_files and not is_sharded_model(model):
        return target
    tensors = trainable_state(model)
    if not write_files:
        return target

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(info, tmp / "info.pt")

    return _write_atomic_dir(target, write)


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random state; return the saved state dict."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    state = torch.load(path / "state.pt", weights_only=False)
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state
