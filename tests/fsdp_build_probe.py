"""Run under torchrun: build a recipe's model for FSDP and record the largest tensor any op touched.

    torchrun --nproc_per_node=2 tests/fsdp_build_probe.py recipe.yaml out_dir (meta|whole)

meta: afina's path (train/fsdp.py: meta device, each process reads its rows); whole: the model built
whole in every process and then sharded (the path FSDP used before), to show the probe sees the
difference. Every aten op's tensors (inputs and outputs, on a real device) pass a TorchDispatchMode that
keeps the largest element count (of a DTensor, its local shard: the mode sees the wrapper, and the
ops on the shard run beneath the mode); byte views of the memory-mapped safetensors file (uint8, not memory
the process fills) are left out. Each rank writes out_dir/rank-N.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None
        self.mapped: set[int] = set()  # storages of the memory-mapped safetensors file (safetensors' set_)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.set_.source_Storage:
            self.mapped.add(out.untyped_storage().data_ptr())
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, DTensor):  # a wrapper: its global shape is not memory; its shard is
                t = t._local_tensor
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() <= self.numel:
                continue
            if t.untyped_storage().data_ptr() in self.mapped:  # a view of the file: only the rows read are paged in
                continue
            self.numel, self.op = t.numel(), str(func)
        return out


def main() -> None:
    from afina.config import load_recipe
    from afina.rundir import RunDir, read_jsonl
    from afina.tasks import task_for
    from afina.train.distributed import Distributed
    from afina.train.fsdp import build_sharded_model

    recipe_path, out_dir, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    recipe = load_recipe(recipe_path)
    ddp = Distributed.from_env("fsdp")
    run = RunDir(recipe.run_dir)
    task = task_for(recipe).training_task(recipe, run, read_jsonl(run.split_path("train")))
    probe = LargestTensor()
    with probe:
        if how == "meta":
            model = build_sharded_model(
                task.build_model,
                recipe.model.name,
                torch.device("cpu"),
                "float32",
                recipe.method.type == "full",
                recipe.seed,
            )
        else:
            model = task.build_model(torch.device("cpu"))
            ddp.shard(model)
    largest_param = max(p.numel() for p in model.parameters())  # a DTensor's numel is the whole tensor's
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank-{ddp.rank}.json").write_text(
        json.dumps(
            {"largest_touched": probe.numel, "op": probe.op, "largest_parameter": largest_param, "local_bytes": local}
        )
    )
    dist.barrier()
    ddp.close()


if __name__ == "__main__":
    main()
