"""The check every writer of weights runs: a folder or tensor set that holds no tensors is an error.

A safetensors file with a header and no tensors loads without complaint: an adapter of that kind gives
the base model back, a model of that kind gives random weights, and the run that wrote it reported
success (an FSDP LoRA run under peft 0.22 did exactly that). So each save path says so at once, naming
what it was writing, instead of leaving the surprise to whoever loads the result.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any


class EmptyWeightsError(RuntimeError):
    """Weights about to be written, or just written, hold no tensors."""


def require_tensors(tensors: Collection[Any], what: str) -> None:
    """`tensors` (name -> tensor, or (name, tensor) pairs) about to be saved as `what` must hold at least one."""
    if not tensors:
        raise EmptyWeightsError(
            f"{what}: no tensors to save (the model has no trainable parameters, or none were matched to "
            "their saved names); nothing was written"
        )


def saved_tensor_count(folder: Path) -> int:
    """How many tensors the safetensors files in `folder` hold (their headers only are read)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            count += len(list(fh.keys()))
    return count


def require_saved_weights(folder: Path) -> int:
    """After a save: `folder` holds safetensors weights with at least one tensor; returns the count."""
    count = saved_tensor_count(folder)
    if count == 0:
        files = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        found = f"{', '.join(files)} hold no tensors" if files else "no .safetensors file was written"
        raise EmptyWeightsError(
            f"{folder}: the saved weights are empty ({found}); the result would load as an untrained model. "
            "This is a bug in the save path: please report it with the run's manifest.json"
        )
    return count
