"""The optimizer (`training.optimizer`) and what its state costs in memory.

    adamw             torch AdamW: two float32 moments, 8 bytes per trained weight
    adamw_8bit        bitsandbytes AdamW8bit: two 8-bit block-quantized moments, 2 bytes (plus a float32
                      absmax per 256-weight block); tensors under 4096 weights keep float32 moments
    paged_adamw_8bit  the same in paged memory that moves to host RAM when the GPU runs short
    adafactor         transformers' Adafactor with a fixed learning rate: a matrix keeps one float32
                      second moment per row and per column (4 * (rows + cols) bytes), a vector 4 bytes a weight

Weights trained in bfloat16/float16 go through MasterWeights: the optimizer updates a float32 copy
and the low-precision weights are refreshed from it after every step (train/precision.py says why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 state for tensors smaller than this
BNB_BLOCK = 256  # weights per quantization block of the 8-bit state (one float32 absmax each)


def state_bytes(optimizer: str, shape: tuple[int, ...]) -> int:
    """Bytes of optimizer state for one trained tensor of this shape (excluding the master copy)."""
    numel = 1
    for size in shape:
        numel *= size
    if optimizer == "adamw":
        return 8 * numel
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        if numel < BNB_MIN_8BIT_SIZE:
            return 8 * numel
        blocks = -(-numel // BNB_BLOCK)
        return 2 * (numel + 4 * blocks)
    if optimizer == "adafactor":
        if len(shape) >= 2:
            rows = numel // shape[-1]
            return 4 * (rows + shape[-1])
        return 4 * numel
    raise ValueError(f"training.optimizer: unknown optimizer '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}")


def _inner_factory(name: str, learning_rate: float, weight_decay: float) -> Callable[[list[dict[str, Any]]], Any]:
    if name == "adamw":
        return lambda groups: torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(f"training.optimizer={name} needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return lambda groups: cls(groups, lr=learning_rate, weight_decay=weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the recipe's, under its scheduler) rather than Adafactor's relative steps.
        return lambda groups: Adafactor(
            groups,
            lr=learning_rate,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise ValueError(f"training.optimizer: unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(groups: Iterable[dict[str, Any]], training) -> torch.optim.Optimizer:
    """The recipe's optimizer over param groups (each a dict with `params` and optionally `lr`).
    Weights in bfloat16/float16 get a float32 master copy (MasterWeights)."""
    groups = [dict(g, params=list(g["params"])) for g in groups]
    make = _inner_factory(training.optimizer, training.learning_rate, training.weight_decay)
    if any(p.dtype in (torch.bfloat16, torch.float16) for g in groups for p in g["params"]):
        return MasterWeights(groups, make)
    return make(groups)


class MasterWeights(torch.optim.Optimizer):
    """Low-precision weights trained through a float32 copy of themselves.

    step(): each low-precision gradient becomes the float32 copy's gradient (and is freed), the inner
    optimizer updates the float32 copy, and the model's weights are set to it, rounded to their dtype.
    An update far below the weights' rounding step so accumulates in float32 instead of vanishing.
    param_groups are the inner optimizer's, so a learning-rate scheduler drives it as usual.
    """

    def __init__(self, groups: list[dict[str, Any]], make_inner: Callable[[list[dict[str, Any]]], Any]):
        self.low: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        self.master: list[torch.Tensor] = [p.detach().float().clone() for p in self.low]
        by_id = {id(p): m for p, m in zip(self.low, self.master, strict=True)}
        master_groups = [dict(g, params=[by_id[id(p)] for p in g["params"]]) for g in groups]
        self.inner = make_inner(master_groups)
        super().__init__(master_groups, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):  # the training loop computes the gradients itself
        for low, master in zip(self.low, self.master, strict=True):
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None  # the float32 gradient replaces it: one copy at a time
        self.inner.step()
        for low, master in zip(self.low, self.master, strict=True):
            low.copy_(master)
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.low:
            p.grad = None
        for m in self.master:
            m.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "master": [m.clone() for m in self.master]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"inner", "master"} or len(state_dict["master"]) != len(self.master):
            raise ValueError(
                "the checkpoint's optimizer state was not written with float32 master weights for this "
                "model; resume with the same model.dtype and method as the run that wrote it"
            )
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        with torch.no_grad():
            for low, master, saved in zip(self.low, self.master, state_dict["master"], strict=True):
                master.copy_(saved)
                low.copy_(master)
