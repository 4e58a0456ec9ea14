"""Run under torchrun: `afina train RECIPE` with every torch.distributed collective watched.

    torchrun --nproc_per_node=2 tests/collective_probe.py recipe.yaml out_dir

Each collective's tensors are recorded with their device, dtype and size, beside the device the process
group's backend takes (afina's collective_device(): CUDA for NCCL, the CPU for gloo), asked at the call. A
tensor on another device is what stops a GPU run at its first step (NCCL refuses CPU tensors); on CPUs
with gloo the rule is the same one, checked the same way. Each rank writes out_dir/rank-N.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
)
seen: list[dict] = []


def tensors_in(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from tensors_in(value)


def watch(name: str) -> None:
    original = getattr(dist, name)

    def watched(*args, **kwargs):
        from afina.train.distributed import collective_device

        expected = str(collective_device())
        for t in tensors_in([*args, *kwargs.values()]):
            seen.append(
                {"op": name, "device": str(t.device), "expected": expected, "dtype": str(t.dtype), "numel": t.numel()}
            )
        return original(*args, **kwargs)

    setattr(dist, name, watched)


for collective in COLLECTIVES:
    watch(collective)

recipe, out = sys.argv[1], Path(sys.argv[2])
sys.argv = ["afina", "train", recipe]
from afina.cli import main  # noqa: E402  (after the collectives are watched)

try:
    main()
finally:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
