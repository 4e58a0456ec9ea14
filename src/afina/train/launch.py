"""`afina train --nproc-per-node N`: afina starts torchrun itself, as `tune run --nproc_per_node` and
`llamafactory-cli` do for their users, so nobody types `python -m torch.distributed.run ... -m afina`.

One machine: torchrun's --standalone (a local rendezvous on a free port). Several machines: the same
command on each, with --nnodes, --node-rank and --rdzv-endpoint (host:port of node 0), passed on to
torchrun's c10d rendezvous. The processes run `afina train` with the same recipe, overrides and
--resume; training.distributed (ddp or fsdp) says how they share the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                "--nnodes above 1 needs --rdzv-endpoint HOST:PORT (node 0's address), the same on every node"
            )

    def torchrun_args(self) -> list[str]:
        """torchrun's own flags for this launch."""
        args = [f"--nproc_per_node={self.nproc_per_node}"]
        if self.nnodes == 1 and not self.rdzv_endpoint:
            return ["--standalone", *args]
        return [
            *args,
            f"--nnodes={self.nnodes}",
            f"--node_rank={self.node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={self.rdzv_endpoint}",
        ]


def under_torchrun() -> bool:
    """This process was started by torchrun (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_train(launch: Launch, train_args: list[str]) -> int:
    """Run `afina train TRAIN_ARGS` under torchrun with this launch; returns torchrun's exit status."""
    launch.check()
    command = [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args(), "-m", "afina", "train"]
    print(f"afina train: starting {launch.nproc_per_node * launch.nnodes} processes with torchrun", file=sys.stderr)
    return subprocess.run([*command, *train_args]).returncode
