"""Checkpoints of an FSDP run, sharded: every process writes its own shards (torch.distributed.checkpoint).

A checkpoint folder `checkpoints/step-00000040/` holds `shards/` (the trainable weights and the
optimizer state, each process's part in its own file, written by DCP) and `state.pt` (scheduler,
random generators, the data order still to come, counters, and the process count), written by
rank 0. As for unsharded checkpoints (train/checkpoint.py) it is written into a temporary folder
and renamed into place once every process has finished, so a crash leaves whole checkpoints only.
No process gathers a whole tensor. A resumed run must use the same number of processes: the data
order still to come is dealt out by rank. Rank 0 records every file's size and sha256 (checksums.json,
as for unsharded checkpoints) once all processes have written, and --resume skips a damaged checkpoint
for the newest intact one, naming it.

Resuming unpickles nothing: a checkpoint folder is data a user may have been sent, and a pickle can
run any command. state.pt is read with weights_only=True; DCP's `.metadata` (a pickle) through an
unpickler that admits only DCP's own metadata classes, torch sizes, dtypes and layouts and paths; the
non-tensor entries of the shards (the optimizer's hyperparameters) with weights_only=True as well.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from afina.models.saved import require_tensors
from afina.train.checkpoint import (
    DamagedCheckpointError,
    checkpoint_problem,
    list_checkpoints,
    python_rng_state,
    write_checksums,
)

PREFIX = "step-"


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's .metadata and refuses any global that is not one of its plain data types."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == dcp_metadata.__name__:
            found = getattr(dcp_metadata, name, None)
            if isinstance(found, type) and found.__module__ == module:  # its dataclasses and enums only
                return found
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a checkpoint's metadata (only torch.distributed.checkpoint's "
            "own classes are); this checkpoint was not written by afina, or was altered"
        )


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"{path}: not a checkpoint's metadata ({type(metadata).__name__})")
        storage_meta = getattr(metadata, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with the shards' non-tensor entries read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # DCP's own helper

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _load_shards(state: dict[str, Any], shards: Path) -> None:
    dcp.load(state, storage_reader=SafeReader(str(shards)), planner=SafeLoadPlanner())


def _write_atomic(target: Path, is_main: bool, write) -> Path:
    """Every process calls this; write(tmp) writes its part; rank 0 records the checksums of every file and
    renames tmp into place after all are done."""
    tmp = target.with_name(f".{target.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    _barrier()
    if is_main:
        write_checksums(tmp)
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
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def write(tmp: Path) -> None:
        trainable = _trainable(model)
        require_tensors(trainable, f"sharded checkpoint {tmp.parent}")
        state = {"model": trainable, "optimizer": get_optimizer_state_dict(model, optimizer)}
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


def resume_sharded_checkpoint(
    folder: Path, model, optimizer, scheduler, rng: random.Random
) -> tuple[Path, dict[str, Any]]:
    """Restore the newest intact sharded checkpoint in `folder`; a damaged newer one is skipped with a message
    naming it and why. Rank 0 checks the files (each is hashed once, not once per process) and tells the
    others which checkpoint to load."""
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {folder}; run `afina train` without --resume")
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        verdict[0] = _newest_intact(found)
    dist.broadcast_object_list(verdict, src=0)  # between afina's own processes: (index, reasons), no files
    index, skipped = verdict[0]
    if index is None:
        raise DamagedCheckpointError(
            f"no intact checkpoint to resume from in {folder}: "
            + "; ".join(skipped)
            + ". Restore the folder from a backup, or delete it and run `afina train` without --resume"
        )
    path = found[index]
    check_layout(path, sharded=True)
    return path, load_sharded_checkpoint(path, model, optimizer, scheduler, rng)


def _newest_intact(found: list[Path]) -> tuple[int | None, list[str]]:
    """The index of the newest checkpoint whose files match their checksums, and why each newer one does not."""
    skipped: list[str] = []
    for index in range(len(found) - 1, -1, -1):
        path = found[index]
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                print(
                    f"resuming from {path.name}, the newest intact checkpoint (skipped {len(skipped)} damaged)",
                    file=sys.stderr,
                )
            return index, skipped
        skipped.append(f"{path.name}: {problem}")
        print(f"checkpoint {path} is damaged: {problem}; trying an older one", file=sys.stderr)
    return None, skipped


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random) -> dict[str, Any]:
    """Restore this process's shards of the weights and optimizer state, and the scheduler and random state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    check_layout(path, sharded=True)
    # weights_only: tensors, numbers, strings and containers; never code (a pickle can run any command).
    state = torch.load(path / "state.pt", weights_only=True)
    if state["world_size"] != dist.get_world_size():
        raise ValueError(
            f"{path}: written by {state['world_size']} processes, resumed with {dist.get_world_size()}; "
            f"resume with --nproc_per_node={state['world_size']} (the data still to come is dealt by rank)"
        )
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    _load_shards({"model": _trainable(model), "optimizer": optimizer_state}, path / "shards")
    set_optimizer_state_dict(model, optimizer, optimizer_state)  # loaded in place above, into these tensors
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(python_rng_state(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    return state


def save_sharded_weights(target: Path, model, info: dict[str, Any], is_main: bool) -> Path:
    """The trainable weights alone (the best checkpoint), sharded; every process calls it."""

    def write(tmp: Path) -> None:
        trainable = _trainable(model)
        require_tensors(trainable, f"sharded checkpoint {tmp.parent}")
        dcp.save({"model": trainable}, checkpoint_id=str(tmp / "shards"))
        if is_main:
            torch.save(info, tmp / "info.pt")

    return _write_atomic(target, is_main, write)


def load_sharded_weights(target: Path, model) -> None:
    problem = checkpoint_problem(target)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {target} is damaged: {problem}")
    _load_shards({"model": _trainable(model)}, target / "shards")


def has_weights(target: Path) -> bool:
    return (target / "shards").is_dir()
