"""The dtype a model's weights are held in (`model.dtype`), apart from the dtype matmuls run in
(`training.precision`, autocast).

LoRA/QLoRA: the frozen base is held in the weight dtype and the adapter in float32, as TRL,
Unsloth and Axolotl do: half the weight memory of a float32 base, and no cast of every frozen
weight at every step under autocast.

Full fine-tuning in bfloat16: an update smaller than half a bfloat16 step of the weight (8 bits of
mantissa: ~0.4% of its size) rounds away, so plain bfloat16 weights stop learning once the learning
rate decays. afina keeps a float32 master copy in the optimizer (train/optim.py: MasterWeights): the
model computes in bfloat16, the update lands on float32 weights, and the bfloat16 copy is refreshed
from them after every step (bench/bench_dtype.py measures this against float32 and plain bfloat16).
"""

from __future__ import annotations

import torch


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def keep_trainable_in_float32(model) -> None:
    """Adapters (and anything else that trains) stay float32 beside a low-precision frozen base: their
    small updates would round away in bfloat16, and they are a small share of the memory."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
