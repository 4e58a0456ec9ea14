"""Where to run and in which precision."""

from __future__ import annotations

import contextlib
import functools
import resource
import sys

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls run natively: CUDA with bf16 support, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


WEIGHT_DTYPES = ("bfloat16", "float16", "float32")


def resolve_weight_dtype(dtype: str, precision: str, device: torch.device) -> str:
    """`model.dtype` as a torch dtype name. `precision` is the resolved training.precision (bf16 | fp32).

    auto: float32 when training computes in float32 (precision fp32: the weights are the compute; a CPU
    without AVX512-BF16/AMX multiplies bfloat16 ~6x slower than float32, so auto precision is fp32 there);
    else bfloat16 where the device runs it natively; float16 on a GPU without bfloat16; float32 otherwise.
    Training, evaluation and serving load a run's weights in this dtype (train/precision.py says why).
    """
    if dtype != "auto":
        return dtype
    if precision == "fp32":
        return "float32"
    if bf16_is_fast(device):
        return "bfloat16"
    return "float16" if device.type == "cuda" else "float32"


def recipe_weight_dtype(recipe, device: torch.device) -> str:
    """The weight dtype a recipe trains (and so evaluates and serves) in on this device."""
    return resolve_weight_dtype(recipe.model.dtype, resolve_precision(recipe.training.precision, device), device)


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument callable returning the autocast context for this precision."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, a line now and then in a log."""
    return 0.2 if sys.stderr.isatty() else 9.0


def progress_line(text: str, enabled: bool = True) -> None:
    """One line on stderr saying which phase of a long stage starts (with a bar after it where it loops), so a
    user never watches a silent terminal wondering whether it hangs."""
    if enabled:
        print(text, file=sys.stderr, flush=True)
