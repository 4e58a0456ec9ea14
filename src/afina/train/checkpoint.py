"""Resumable training state, written atomically.

A checkpoint is a folder `checkpoints/step-00000040/` holding the trainable weights
(safetensors) and everything else a resumed run needs to continue exactly as if it had never
stopped: optimizer, scheduler, random generators, the data order still to come, counters and
history (state.pt). It is written into a temporary folder and renamed into place, so a crash
mid-write leaves either the previous checkpoints or the new one, never half of one.

Each checkpoint also holds `checksums.json` (size and sha256 of every file). `--resume` verifies it
and falls back to the newest intact checkpoint, saying which it skipped and why (a disk that filled
up, a copy cut short). state.pt is read with `torch.load(weights_only=True)`: it holds tensors,
numbers, strings and containers only, and a file planted in the run folder cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from afina.models.saved import require_tensors

PREFIX = "step-"
CHECKSUMS = "checksums.json"


class DamagedCheckpointError(FileNotFoundError):
    """No checkpoint that can be resumed from (each is damaged or unreadable); the message lists why."""


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
        raise ValueError(
            f"the checkpoint does not match this model/method: {len(missing)} trainable tensors missing, "
            f"e.g. {missing[0]}"
        )
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

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
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
    folder: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    rng: random.Random,
    extra: dict[str, Any],
    keep: int,
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
    require_tensors(tensors, f"checkpoint {path}")
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
        write_checksums(tmp)

    _write_atomic_dir(path, write)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_weights(target: Path, model, info: dict[str, Any], write_files: bool = True) -> Path:
    """The trainable weights alone (the best checkpoint), atomically; every process calls it under FSDP."""
    if not write_files and not is_sharded_model(model):
        return target
    tensors = trainable_state(model)
    require_tensors(tensors, f"checkpoint {target}")
    if not write_files:
        return target

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(info, tmp / "info.pt")
        write_checksums(tmp)

    return _write_atomic_dir(target, write)


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the size and sha256 of every file in `folder` and its sub-folders (a sharded checkpoint's
    shards/), by relative path, before the folder is renamed into place."""
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != CHECKSUMS
    }
    (folder / CHECKSUMS).write_text(json.dumps(files, indent=1) + "\n", encoding="utf-8")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every recorded file is whole.

    Checkpoints written before checksums existed have no checksums.json: they pass here, and a
    damaged one is caught when it fails to load.
    """
    listing = path / CHECKSUMS
    if not listing.is_file():
        return None
    try:
        recorded = json.loads(listing.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{CHECKSUMS} is unreadable ({exc})"
    for name, want in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match the sha256 written with it"
    return None


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(path / "trainable.safetensors"))
    # weights_only: tensors, numbers, strings and containers; never code (a pickle can run any command).
    state = torch.load(path / "state.pt", weights_only=True)
    return tensors, state


def _apply_checkpoint(tensors, state, model, optimizer, scheduler, rng: random.Random) -> dict[str, Any]:
    load_trainable_state(model, tensors)
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(python_rng_state(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    return state


def python_rng_state(saved) -> tuple:
    # random.getstate() is (version, tuple of ints, gauss_next); a round trip may give lists.
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def resume_checkpoint(folder: Path, model, optimizer, scheduler, rng: random.Random) -> tuple[Path, dict[str, Any]]:
    """Restore the newest intact checkpoint in `folder`; return its path and saved state.

    A damaged newer one is skipped with a message on stderr naming it and the reason.
    """
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {folder}; run `afina train` without --resume")
    skipped: list[str] = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                tensors, state = _read_checkpoint(path)
            except Exception as exc:  # a truncated or foreign file: any reader error means "not usable"
                problem = f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        if problem is not None:
            skipped.append(f"{path.name}: {problem}")
            print(f"checkpoint {path} is damaged: {problem}; trying an older one", file=sys.stderr)
            continue
        if skipped:
            print(
                f"resuming from {path.name}, the newest intact checkpoint (skipped {len(skipped)} damaged)",
                file=sys.stderr,
            )
        return path, _apply_checkpoint(tensors, state, model, optimizer, scheduler, rng)
    raise DamagedCheckpointError(
        f"no intact checkpoint to resume from in {folder}: "
        + "; ".join(skipped)
        + ". Restore the folder from a backup, or delete it and run `afina train` without --resume"
    )


def load_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and random state from `path`; return the saved state dict."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {problem}")
    tensors, state = _read_checkpoint(path)
    return _apply_checkpoint(tensors, state, model, optimizer, scheduler, rng)
